"""Img2Vec student: an MAE-style ViT that regresses a frozen teacher's feature tokens.

Encoder keys follow timm's VisionTransformer, so `encoder_state_dict()` loads with strict keys into
`timm.create_model("vit_*_patch16_224", num_classes=0)`.
"""

from functools import partial

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from common.compiled import compile_forward
from common.config import ConfigError

from common.teacher import grid_stride

from .losses import global_loss, patch_loss
from .masking import unit_mask, units_to_patches

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


# --------------------------------------------------------------------------------------------------------
# fixed 2-D sin-cos position embedding (MAE's get_2d_sincos_pos_embed, same layout and values)


def sincos_1d(dim, pos):
    """pos: [M] -> [M, dim]"""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double().reshape(-1)[:, None] * omega[None]  # [M, dim/2]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim, grid_h, grid_w, cls_token=True):
    """-> [1 + grid_h*grid_w, dim] (cls row zeros); MAE puts the column coordinate in the first half."""
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def mlp_head(in_dim, hidden, out_dim):
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


def parse_multi_block(spec, depth):
    """"mean" -> all blocks, "last" -> the last one, "3,7,11" -> those blocks (0-based)."""
    if isinstance(spec, str) and spec in ("mean", "last"):
        return list(range(depth)) if spec == "mean" else [depth - 1]
    try:
        ids = sorted({int(i) for i in (spec.split(",") if isinstance(spec, str) else spec)})
    except (TypeError, ValueError):
        raise ValueError(f"student.multi_block: expected 'mean', 'last' or block indices like '3,7,11'; "
                         f"got {spec!r}") from None
    if not ids or ids[0] < 0 or ids[-1] >= depth:
        raise ValueError(f"student.multi_block: indices {spec!r} must lie in 0..{depth - 1}")
    return ids


def shuffle_ids(patch_mask):
    """Visible patches first (in raster order), then masked ones. patch_mask: [N, L] -> ids_shuffle,
    ids_restore: [N, L]"""
    ids_shuffle = torch.argsort(patch_mask.to(torch.uint8), dim=1, stable=True)
    return ids_shuffle, torch.argsort(ids_shuffle, dim=1)


# --------------------------------------------------------------------------------------------------------


class Img2VecStudent(nn.Module):
    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 decoder_dim=512, decoder_depth=2, decoder_heads=16, teacher_dim=2048, teacher_stride=None,
                 head_hidden=2048, multi_block="mean", mask_ratio=0.6, masks_per_view=1):
        """teacher_stride: input pixels per teacher token side (build_student: the cache's); None = 2 patches, as a
        ResNet's last stage (32) over 16-pixel patches."""
        super().__init__()
        teacher_stride = teacher_stride or 2 * patch_size
        if img_size % teacher_stride or teacher_stride % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of teacher_stride {teacher_stride}, "
                             f"and teacher_stride a multiple of patch_size {patch_size}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"student.mask_ratio must lie in [0, 1), got {mask_ratio}")
        if masks_per_view < 1:
            raise ValueError(f"student.masks_per_view must be >= 1, got {masks_per_view}")
        self.unit = teacher_stride // patch_size  # student patches per teacher token, per side
        self.grid = img_size // teacher_stride  # teacher tokens per side
        self.mask_ratio = mask_ratio
        self.masks_per_view = masks_per_view  # M: masked copies of each view per step, targets shared
        self.block_ids = set(parse_multi_block(multi_block, depth))

        # encoder (timm VisionTransformer names)
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
                                     for _ in range(depth)])
        self.norm = LayerNorm(embed_dim)

        # decoder: patch tokens -> merged per teacher token -> projection head
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, decoder_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_dim, decoder_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
            for _ in range(decoder_depth)])
        self.decoder_norm = LayerNorm(decoder_dim)
        self.unit_merge = nn.Linear(self.unit**2 * decoder_dim, decoder_dim)
        self.proj_head = mlp_head(decoder_dim, head_hidden, teacher_dim)

        # global semantic head on the pooled visible tokens
        self.global_head = mlp_head(embed_dim, head_hidden, teacher_dim)

        self.initialize_weights()

    def initialize_weights(self):
        gh, gw = self.patch_embed.grid_size
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], gh, gw)[None])
        self.decoder_pos_embed.data.copy_(sincos_2d(self.decoder_pos_embed.shape[-1], gh, gw)[None])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear, like MAE
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token", "mask_token", "decoder_pos_embed"}

    def encoder_state_dict(self):
        """The encoder under timm's keys: patch_embed.*, cls_token, pos_embed, blocks.*, norm.*"""
        keep = ("patch_embed.", "blocks.", "norm.")
        return {k: v for k, v in self.state_dict().items()
                if k in ("cls_token", "pos_embed") or k.startswith(keep)}

    # ----------------------------------------------------------------------------------------------------

    def draw_mask(self, batch, device, generator=None):
        """-> mask_units: [N, T] bool on `device`, True = masked teacher token (drawn on the generator's device)"""
        return unit_mask(batch, self.grid, self.grid, self.mask_ratio, generator=generator, device=device).to(device)

    def forward_features(self, imgs):
        """Unmasked encoder, as timm's forward_features. imgs: [N, 3, H, W] -> x: [N, 1+L, D]"""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_encoder(self, imgs, mask_units):
        """imgs: [N, 3, H, W], mask_units: [N, T] -> latent: [N, 1+L_vis, D], ids_restore: [N, L]"""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]  # x: [N, L, D]
        n, num_patches, dim = x.shape
        patch_mask = units_to_patches(mask_units, self.grid, self.grid, self.unit)  # [N, L]
        ids_shuffle, ids_restore = shuffle_ids(patch_mask)
        num_visible = num_patches - int(patch_mask[0].sum())  # same in every image: fixed unit count
        if num_visible == 0:
            raise ValueError("the mask hides every patch; lower student.mask_ratio")
        ids_keep = ids_shuffle[:, :num_visible]
        x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, dim))  # x: [N, L_vis, D]

        cls = (self.cls_token + self.pos_embed[:, :1]).expand(n, -1, -1)
        x = torch.cat([cls, x], dim=1)  # x: [N, 1+L_vis, D]

        # multi-block feature learning: average the selected blocks' outputs, then the final norm
        agg = 0
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.block_ids:
                agg = agg + x
        latent = self.norm(agg / len(self.block_ids))
        return latent, ids_restore

    def forward_decoder(self, latent, patch_mask):
        """latent: [N, 1+L_vis, D], patch_mask: [N, L] -> pred: [N, T, C_teacher]"""
        x = self.decoder_embed(latent)  # x: [N, 1+L_vis, Dd]
        n, _, dim = x.shape
        _, ids_restore = shuffle_ids(patch_mask)
        num_patches = ids_restore.shape[1]
        mask_tokens = self.mask_token.expand(n, num_patches + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # shuffled order: visible, then masked
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, dim))  # x_: [N, L, Dd]
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # x: [N, 1+L, Dd]
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)[:, 1:]  # x: [N, L, Dd]

        # each teacher token <- its unit x unit patches, concatenated in raster order
        g, u = self.grid, self.unit
        x = x.reshape(n, g, u, g, u, dim).permute(0, 1, 3, 2, 4, 5).reshape(n, g * g, u * u * dim)
        return self.proj_head(self.unit_merge(x))  # [N, T, C_teacher]

    def forward_global(self, latent):
        """Pool the visible patch tokens (no cls). latent: [N, 1+L_vis, D] -> [N, C_teacher]"""
        return self.global_head(latent[:, 1:].mean(dim=1))

    def forward_loss(self, pred, global_pred, teacher_tokens, mask_units, beta, global_weight):
        """pred, teacher_tokens: [N, T, C], global_pred: [N, C], mask_units: [N, T]"""
        loss_patch = patch_loss(pred, teacher_tokens, mask_units, beta)
        loss_global = global_loss(global_pred, teacher_tokens.mean(dim=1), beta)
        return loss_patch + global_weight * loss_global, loss_patch, loss_global

    def forward(self, imgs, teacher_tokens, unit_mask=None, beta=2.0, global_weight=0.5, generator=None):
        """imgs: [B, 3, H, W] normalised; teacher_tokens: [B, T, C] normalised targets.

        Each view is trained with M = masks_per_view independent masks: the batch becomes N = B x M masked
        copies (copy j of view b at row b*M + j), the targets are shared. Masks are drawn from `generator`
        unless `unit_mask` [N, T] is given."""
        if self.masks_per_view > 1:
            imgs = imgs.repeat_interleave(self.masks_per_view, dim=0)  # [N, 3, H, W]
            teacher_tokens = teacher_tokens.repeat_interleave(self.masks_per_view, dim=0)  # [N, T, C]
        if unit_mask is None:
            unit_mask = self.draw_mask(imgs.shape[0], imgs.device, generator)
        elif unit_mask.shape[0] != imgs.shape[0]:
            raise ValueError(f"unit_mask has {unit_mask.shape[0]} rows; batch x masks_per_view = {imgs.shape[0]}")
        latent, _ = self.forward_encoder(imgs, unit_mask)
        pred = self.forward_decoder(latent, units_to_patches(unit_mask, self.grid, self.grid, self.unit))
        global_pred = self.forward_global(latent)
        loss, loss_patch, loss_global = self.forward_loss(pred, global_pred, teacher_tokens, unit_mask,
                                                          beta, global_weight)
        return dict(loss=loss, patch_loss=loss_patch, global_loss=loss_global, pred=pred,
                    global_pred=global_pred, mask=unit_mask)


def param_groups(model, weight_decay):
    """AdamW groups: norms, biases (ndim <= 1) and embeddings (cls/mask tokens, pos embeds) get no decay."""
    inner = getattr(model, "module", model)  # unwrap DDP
    skip = inner.no_weight_decay() if hasattr(inner, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in inner.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.split(".")[-1] in skip else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


# --------------------------------------------------------------------------------------------------------
# model sizes: the encoder, and the decoder that goes with it. Img2Vec: 2 decoder blocks for ViT-B, 4 for
# ViT-L; ViT-H keeps 4 (its encoder is 1.3x deeper than ViT-L's, not 2x as ViT-L's is than ViT-B's).

SIZES = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3, decoder_depth=2, decoder_dim=512, decoder_heads=16),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, decoder_depth=2, decoder_dim=512, decoder_heads=16),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, decoder_depth=2, decoder_dim=512, decoder_heads=16),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, decoder_depth=4, decoder_dim=512, decoder_heads=16),
    "vit_huge": dict(embed_dim=1280, depth=32, num_heads=16, decoder_depth=4, decoder_dim=512, decoder_heads=16),
}
FROM_ARCH = ("decoder_depth", "decoder_dim", "decoder_heads")  # student.* keys where 0 = the arch's value


def _student(arch, kw):
    """`vit_<size>_patch<p>`: the size's encoder and decoder, p-pixel patches (16; 14 for a /14 ViT teacher)."""
    size, patch = arch.rsplit("_patch", 1)
    return Img2VecStudent(**{"patch_size": int(patch), **SIZES[size], **kw})


def vit_tiny_patch16(**kw):
    return _student("vit_tiny_patch16", kw)


def vit_small_patch16(**kw):
    return _student("vit_small_patch16", kw)


def vit_base_patch16(**kw):
    return _student("vit_base_patch16", kw)


def vit_large_patch16(**kw):
    return _student("vit_large_patch16", kw)


def vit_huge_patch16(**kw):
    return _student("vit_huge_patch16", kw)


def _patch14(size):
    """The /14 student of a size, for /14 ViT teachers (DINOv2, CLIP ViT-L/14): one teacher token per patch."""
    def build(**kw):
        return _student(f"vit_{size}_patch14", kw)
    build.__name__ = build.__qualname__ = f"vit_{size}_patch14"
    return build


STUDENTS = {
    "vit_tiny_patch16": vit_tiny_patch16,
    "vit_small_patch16": vit_small_patch16,
    "vit_base_patch16": vit_base_patch16,
    "vit_large_patch16": vit_large_patch16,
    "vit_huge_patch16": vit_huge_patch16,
    **{f"vit_{size}_patch14": _patch14(size) for size in ("tiny", "small", "base", "large", "huge")},
}


def resolve_student(student):
    """A [student] config with every 0 ("from the architecture") in FROM_ARCH replaced by the arch's value;
    changed in place and returned, so the run's config.json records what was built."""
    if student.arch not in STUDENTS:
        raise ConfigError(f"student.arch: unknown {student.arch!r} (choose from {', '.join(STUDENTS)})")
    for key in FROM_ARCH:
        if getattr(student, key) == 0:
            setattr(student, key, SIZES[student.arch.rsplit("_patch", 1)[0]][key])
    return student


def describe_student(student) -> str:
    s = student
    return (f"student {s.arch}: decoder {s.decoder_depth} blocks x {s.decoder_dim} wide, {s.decoder_heads} heads; "
            f"mask_ratio {s.mask_ratio}, masks_per_view {s.masks_per_view}, multi_block {s.multi_block!r}")


def build_student(cfg, token_grid: tuple[int, int], size: int) -> nn.Module:
    """The student `cfg.student` names, sized for the cache: its crop `size` and token grid (tokens, teacher
    channels), as the manifest records them (Manifest.token_grid, .augment.size)."""
    s = resolve_student(cfg.student)  # 0 = the arch's value, written into cfg (and so into config.json)
    tokens, channels = token_grid
    return STUDENTS[s.arch](img_size=size, teacher_dim=channels, teacher_stride=grid_stride(size, tokens),
                            decoder_depth=s.decoder_depth, decoder_dim=s.decoder_dim, decoder_heads=s.decoder_heads,
                            head_hidden=s.head_hidden, multi_block=s.multi_block, mask_ratio=s.mask_ratio,
                            masks_per_view=s.masks_per_view)


def compile_student(model: Img2VecStudent) -> Img2VecStudent:
    """`train.compile`: each transformer block's forward compiled in place (regional compilation: one graph serves
    every encoder block, one every decoder block, so it compiles ~2x sooner than the whole forward, which dynamo
    would cut at the mask's count anyway). Parameters and state-dict keys stay as they are; eager if it fails."""
    for block in (*model.blocks, *model.decoder_blocks):
        compile_forward(block, "train.compile: the student's blocks")
    return model
