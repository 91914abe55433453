from pathlib import Path

import pytest
import timm
import torch

from train.losses import global_loss, normalize_targets, patch_loss, smooth_l1
from train.masking import unit_mask, units_to_patches
from common.config import ConfigError, load_config
from train.model import build_student
from train.model import STUDENTS, param_groups, resolve_student, vit_huge_patch16, vit_tiny_patch16

REPO = Path(__file__).resolve().parent.parent


def tiny(**kw):
    cfg = dict(img_size=64, depth=2, decoder_dim=64, decoder_depth=1, decoder_heads=4, teacher_dim=32,
               head_hidden=64)
    return vit_tiny_patch16(**{**cfg, **kw})


# ----------------------------------------------------------------------------------------------------------
# masking


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.4, 0.6, 0.75, 1.0])
def test_unit_mask_exact_count(ratio):
    g = torch.Generator().manual_seed(0)
    m = unit_mask(16, 7, 7, ratio, generator=g)
    assert m.shape == (16, 49) and m.dtype == torch.bool
    assert (m.sum(1) == round(ratio * 49)).all()
    if 0 < ratio < 1:
        assert len({tuple(r.tolist()) for r in m}) > 1  # a different choice per image


def test_units_to_patches_brute_force():
    gh, gw, u = 3, 4, 2
    um = unit_mask(5, gh, gw, 0.5, generator=torch.Generator().manual_seed(1))
    pm = units_to_patches(um, gh, gw, u)
    pw = gw * u
    assert pm.shape == (5, gh * u * pw)
    for n in range(5):
        for i in range(gh * u):
            for j in range(pw):
                assert pm[n, i * pw + j] == um[n, (i // u) * gw + j // u]
    visible, masked = (~pm).sum(1), pm.sum(1)
    assert ((visible + masked) == pm.shape[1]).all() and (masked == um.sum(1) * u * u).all()


def test_encoder_keeps_exactly_visible_patches():
    model = tiny()
    um = unit_mask(3, 2, 2, 0.5, generator=torch.Generator().manual_seed(0))
    latent, ids_restore = model.forward_encoder(torch.randn(3, 3, 64, 64), um)
    assert latent.shape == (3, 1 + 8, 192)
    assert (ids_restore.sort(1).values == torch.arange(16)).all()  # a permutation of all patches


# ----------------------------------------------------------------------------------------------------------
# losses and target normalisation


def smooth_l1_by_hand(a, b, beta):
    x = abs(a - b)
    return 0.5 * x * x / beta if x < beta else x - 0.5 * beta


def test_losses_match_hand_computation():
    torch.manual_seed(0)
    beta = 2.0
    pred, target = 3 * torch.randn(2, 5, 4), 3 * torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    total, count = 0.0, 0
    for n in range(2):
        for t in range(5):
            if mask[n, t]:
                for c in range(4):
                    total += smooth_l1_by_hand(pred[n, t, c].item(), target[n, t, c].item(), beta)
                    count += 1
    assert patch_loss(pred, target, mask, beta).item() == pytest.approx(total / count, rel=1e-5)

    g_pred, g_target = pred.mean(1), target.mean(1)
    hand = [smooth_l1_by_hand(a, b, beta) for a, b in zip(g_pred.flatten().tolist(), g_target.flatten().tolist())]
    assert global_loss(g_pred, g_target, beta).item() == pytest.approx(sum(hand) / len(hand), rel=1e-5)
    assert smooth_l1(g_pred, g_target, beta).item() == pytest.approx(sum(hand) / len(hand), rel=1e-5)


def test_target_normalisation():
    torch.manual_seed(0)
    tokens = 5 + 3 * torch.randn(2, 6, 8)
    assert torch.equal(normalize_targets(tokens, "none"), tokens)

    mu, var = tokens.mean(-1, keepdim=True), tokens.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(normalize_targets(tokens, "layernorm"), (tokens - mu) / torch.sqrt(var + 1e-6))

    mean, var = torch.randn(8), torch.rand(8) + 0.5
    torch.testing.assert_close(normalize_targets(tokens, "channel", mean, var),
                               (tokens - mean) / torch.sqrt(var + 1e-6))
    with pytest.raises(ValueError, match="mean and var"):
        normalize_targets(tokens, "channel")
    with pytest.raises(ValueError, match="unknown target_norm"):
        normalize_targets(tokens, "batch")


# ----------------------------------------------------------------------------------------------------------
# multi-block aggregation


@pytest.mark.parametrize("spec,ids", [("mean", [0, 1, 2]), ("last", [2]), ("0,2", [0, 2]), ("1", [1])])
def test_multi_block_aggregation(spec, ids):
    torch.manual_seed(0)
    model = tiny(depth=3, multi_block=spec).eval()
    imgs = torch.randn(2, 3, 64, 64)
    um = unit_mask(2, 2, 2, 0.5, generator=torch.Generator().manual_seed(3))
    latent, _ = model.forward_encoder(imgs, um)

    # by hand: embed, keep visible patches in raster order, run blocks one by one
    pm = units_to_patches(um, 2, 2, 2)
    x = model.patch_embed(imgs) + model.pos_embed[:, 1:]
    x = x[~pm].reshape(2, -1, 192)
    x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1), x], dim=1)
    outs = []
    for blk in model.blocks:
        x = blk(x)
        outs.append(x)
    expected = model.norm(torch.stack([outs[i] for i in ids]).mean(0))
    torch.testing.assert_close(latent, expected)


def test_multi_block_rejects_bad_spec():
    with pytest.raises(ValueError, match="multi_block"):
        tiny(multi_block="0,5")
    with pytest.raises(ValueError, match="multi_block"):
        tiny(multi_block="all")


# ----------------------------------------------------------------------------------------------------------
# export to timm


def test_encoder_exports_to_timm():
    torch.manual_seed(0)
    student = vit_tiny_patch16(img_size=64, decoder_dim=64, decoder_heads=4, teacher_dim=32, head_hidden=64)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0)
    sd = student.encoder_state_dict()
    assert set(sd) == set(vit.state_dict())
    vit.load_state_dict(sd, strict=True)
    student.eval(), vit.eval()
    imgs = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(student.forward_features(imgs), vit.forward_features(imgs))


@pytest.mark.parametrize("size", ["small", "base", "large", "huge"])
def test_encoder_keys_and_shapes_match_timm_at_224(size):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        student = STUDENTS[f"vit_{size}_patch16"]()
        # timm has no vit_huge_patch16_224: its ViT-H/14 with 16-pixel patches is ViT-H/16
        vit = (timm.create_model("vit_huge_patch14_224", patch_size=16, num_classes=0) if size == "huge" else
               timm.create_model(f"vit_{size}_patch16_224", pretrained=False, num_classes=0))
    ours = {k: v.shape for k, v in student.encoder_state_dict().items()}
    assert ours == {k: v.shape for k, v in vit.state_dict().items()}
    assert len(student.decoder_blocks) == (4 if size in ("large", "huge") else 2)
    if size == "huge":
        assert (len(student.blocks), student.cls_token.shape[-1], student.blocks[0].attn.num_heads) == (32, 1280, 16)
        assert ours["patch_embed.proj.weight"] == (1280, 3, 16, 16) and ours["pos_embed"] == (1, 1 + 14 * 14, 1280)


def test_huge_student_loads_strictly_into_timm_vit_h16_and_gives_the_same_features():
    """ViT-H/16 at 2 blocks and 64 px (the width, heads and key layout of the real one; 32 blocks cost minutes)."""
    torch.manual_seed(0)
    student = vit_huge_patch16(img_size=64, depth=2, decoder_depth=1, decoder_dim=64, decoder_heads=4, teacher_dim=32,
                               head_hidden=64).eval()
    vit = timm.create_model("vit_huge_patch14_224", patch_size=16, depth=2, img_size=64, num_classes=0).eval()
    vit.load_state_dict(student.encoder_state_dict(), strict=True)
    imgs = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(student.forward_features(imgs), vit.forward_features(imgs))


# ----------------------------------------------------------------------------------------------------------
# per-size settings: the config's 0 means "from the architecture"


def test_decoder_settings_come_from_the_arch_unless_the_config_sets_them():
    expect = {"vit_base_patch16": 2, "vit_large_patch16": 4, "vit_huge_patch16": 4}
    for arch, depth in expect.items():
        cfg = load_config(REPO / "pipeline.toml", [f"student.arch={arch}"])
        assert cfg.student.decoder_depth == 0  # pipeline.toml leaves it to the arch
        with torch.device("meta"):
            student = build_student(cfg, (49, 2048), 224)
        assert len(student.decoder_blocks) == depth and cfg.student.decoder_depth == depth  # resolved in cfg
        assert (cfg.student.decoder_dim, cfg.student.decoder_heads) == (512, 16)
        assert student.decoder_embed.out_features == 512 and student.decoder_blocks[0].attn.num_heads == 16
    cfg = load_config(REPO / "pipeline.toml", ["student.arch=vit_large_patch16", "student.decoder_depth=3"])
    with torch.device("meta"):
        assert len(build_student(cfg, (49, 2048), 224).decoder_blocks) == 3  # a set value wins


def test_student_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="student.masks_per_view.*>= 1"):
        load_config(None, ["student.masks_per_view=0"])
    with pytest.raises(ConfigError, match="student.decoder_depth.*>= 0"):
        load_config(None, ["student.decoder_depth=-1"])
    with pytest.raises(ConfigError, match="student.arch.*vit_huge_patch16"):
        resolve_student(load_config(None, ["student.arch=vit_giant_patch16"]).student)


def test_param_groups():
    model = tiny()
    groups = param_groups(model, 0.05)
    ids = {id(p) for p in groups[1]["params"]}
    assert id(model.cls_token) in ids and id(model.mask_token) in ids and id(model.norm.weight) in ids
    assert id(model.blocks[0].attn.qkv.bias) in ids and id(model.blocks[0].attn.qkv.weight) not in ids
    assert all(p.ndim > 1 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.05
    n_trainable = sum(p.requires_grad for p in model.parameters())
    assert len(groups[0]["params"]) + len(ids) == n_trainable  # fixed pos embeds are left out


# ----------------------------------------------------------------------------------------------------------
# training signal


def test_forward_outputs():
    model = tiny()
    targets = torch.randn(3, 4, 32)
    out = model(torch.randn(3, 3, 64, 64), targets, beta=2.0, global_weight=0.5)
    assert out["pred"].shape == (3, 4, 32) and out["global_pred"].shape == (3, 32)
    assert out["mask"].shape == (3, 4) and (out["mask"].sum(1) == round(0.6 * 4)).all()
    torch.testing.assert_close(out["loss"], out["patch_loss"] + 0.5 * out["global_loss"])
    torch.testing.assert_close(out["patch_loss"], patch_loss(out["pred"], targets, out["mask"], 2.0))


def test_tiny_model_overfits_fixed_batch():
    torch.manual_seed(0)
    model = tiny()
    imgs, targets = torch.randn(4, 3, 64, 64), torch.randn(4, 4, 32)
    mask = unit_mask(4, 2, 2, 0.5, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(150):
        loss = model(imgs, targets, unit_mask=mask)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] * 5 <= losses[0]:
            break
    assert losses[-1] * 5 <= losses[0], f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps"


# ----------------------------------------------------------------------------------------------------------
# several masks per view


def test_masks_per_view_equals_m_separate_calls():
    """One call with M masks per view = the mean of M calls, copy j of every view with its own mask (loss and
    gradients): the B x M masked copies are independent and equally weighted, the targets shared."""
    torch.manual_seed(0)
    m, b = 3, 2
    model = tiny(masks_per_view=m)
    imgs, targets = torch.randn(b, 3, 64, 64), torch.randn(b, 4, 32)
    masks = unit_mask(b * m, 2, 2, 0.5, generator=torch.Generator().manual_seed(1))  # row b*M + j
    out = model(imgs, targets, unit_mask=masks)
    assert out["pred"].shape == (b * m, 4, 32) and torch.equal(out["mask"], masks)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out["loss"], params, allow_unused=True)

    model.masks_per_view = 1
    losses, sums = [], None
    for j in range(m):
        loss = model(imgs, targets, unit_mask=masks[j::m])["loss"]
        g = torch.autograd.grad(loss / m, params, allow_unused=True)
        sums = g if sums is None else [a if c is None else a + c for a, c in zip(sums, g)]
        losses.append(loss)
    torch.testing.assert_close(out["loss"], torch.stack(losses).mean())
    for a, c in zip(grads, sums):
        if a is not None:
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)


def test_masks_per_view_draws_independent_masks_from_the_generator():
    m, b = 4, 3
    model = tiny(masks_per_view=m)
    imgs, targets = torch.randn(b, 3, 64, 64), torch.randn(b, 4, 32)
    out = model(imgs, targets, generator=torch.Generator().manual_seed(7))
    expected = unit_mask(b * m, 2, 2, model.mask_ratio, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out["mask"], expected)  # B x M masks, one draw from the step's generator
    again = model(imgs, targets, generator=torch.Generator().manual_seed(7))["mask"]
    assert torch.equal(again, expected)  # the generator alone decides the masks
    copies = out["mask"].view(b, m, -1)
    assert any(len({tuple(c.tolist()) for c in copies[i]}) > 1 for i in range(b))  # not one mask repeated
    with pytest.raises(ValueError, match="masks_per_view"):
        model(imgs, targets, unit_mask=expected[:b])
    with pytest.raises(ValueError, match="masks_per_view"):
        tiny(masks_per_view=0)


@pytest.mark.parametrize("name", ["fp32", "bf16-zstd", "u8-zstd", "u8lin-zstd"])
def test_tokens_decoded_on_the_device_equal_the_codec_decode(name):
    """The loader ships views as stored (bf16 bits, packed uint8) and the step decodes them with torch: the
    same tokens as the numpy decode that verify and the tools use (companded u8 tokens included)."""
    import numpy as np

    from common.codecs import get_codec

    codec = get_codec(name)
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((2, 3, 16, 512)).astype(np.float32)
    tokens[0, 0, 0, :2] = [400.0, -300.0]  # two huge channels over 510 small ones: u8-zstd compands this token
    packed = codec.encode(tokens)
    if name == "u8-zstd":
        assert (np.ascontiguousarray(packed[..., -8:]).view(np.float32)[..., 1] < 0).any()  # a companded token
    batch = torch.stack([torch.stack([codec.to_tensor(v) for v in sample]) for sample in packed])
    torch.testing.assert_close(codec.decode_tensor(batch), torch.from_numpy(codec.decode(packed)), rtol=1e-6, atol=1e-6)
