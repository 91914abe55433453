"""The demo's measurements and report: k-NN of the trained student, the same student at init and the teacher; loss
and k-NN curves; the teacher's similarity maps; the teacher's token diversity, each figure labelled with what it
was measured on; report.json and the printed summary (img2vec demo, steps 4 and 5)."""
from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path


def plot_curves(metrics: Path, png: Path, knn: dict) -> dict:
    """The student's losses and, beside them, its k-NN top-1 as training probed it (train.eval_every), with the
    same student at init and the teacher as lines -> the curves' ends, and the k-NN curve: {"step", "knn_top1"} rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    probed = [(0, knn["init"]["top1"])] + [(r["step"], r["knn_top1"]) for r in rows if "knn_top1" in r]  # 0: init
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8), dpi=120)
    for name in ("loss", "patch_loss", "global_loss"):
        ax.plot([r["step"] for r in rows], [r[name] for r in rows], label=name)
    ax.set(xlabel="step", ylabel="smooth L1", yscale="log", title="student loss")
    ax.legend()
    bx.plot(*zip(*probed), marker="o", label="student (step 0: its init)")
    for name, style in (("init", ":"), ("teacher", "--")):
        bx.axhline(knn[name]["top1"], linestyle=style, color="gray" if name == "init" else "black",
                   label=f"{name} ({knn[name]['top1']:.1f}%)")
    for a in (ax, bx):
        a.set_xlim(0, max([r["step"] for r in rows] + [1]))
    bx.set(xlabel="step", ylabel="top-1 (%)", title=f"k-NN top-1 on the {knn['init']['val_samples']} val images")
    bx.legend(loc="lower right")
    fig.suptitle("Img2Vec demo")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    loss = {"first": rows[0]["loss"], "last": rows[-1]["loss"], "steps": rows[-1]["step"]} if rows else {}
    return {"loss": loss, "knn_curve": [{"step": step, "knn_top1": top1} for step, top1 in probed[1:]]}


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
    row = result["rows"][0]
    return {"files": [str(p) for p in paths], "size": size, "images": row["images"], "grid": row["grid"],
            "token_diversity": row["token_diversity"]}


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


def diversity_figures(manifest, maps: dict, data: dict, r: dict) -> dict:
    """The teacher's token diversity, each figure with what it was measured on: the cache's (every extracted view)
    and the similarity maps' (a few val images at 224 px, where the teacher's token grid is 7x7)."""
    tokens = manifest.token_shape[0]
    figures = {"what": "the paper's token diversity (TD) of the teacher's tokens: 1 - the mean cosine similarity of "
                       "two different tokens of one view, averaged over views; higher is more diverse",
               "cache": {"value": manifest.stats.token_diversity, "size_px": r["size"], "tokens_per_view": tokens,
                         "images": f"the {data['train_images']} train images, {r['views']} random resized crops each: "
                                   "every view extracted into the cache"}}
    if "token_diversity" in maps:
        side = maps["grid"][0]
        figures["maps"] = {"value": maps["token_diversity"], "size_px": maps["size"], "tokens_per_view": side * side,
                           "images": f"the first {maps['images']} val images, center crop: the similarity maps' views"}
    return figures


def write_report(report_dir: Path, args: argparse.Namespace, r: dict, got: dict, times: dict, t_start: float) -> None:
    """Loss and k-NN curves, similarity maps, report.json and the summary; `got` holds what the steps made (data,
    teacher weights and about, manifest, exported, knn)."""
    from common.runtime import write_json_output

    data, weights, knn, manifest = got["data"], got["weights"], got["knn"], got["manifest"]
    curves = plot_curves(report_dir.parent / "run" / "metrics.jsonl", report_dir / "curves.png", knn)
    spec = args.teacher if weights == "random" else f"{args.teacher}={weights}"
    maps = similarity_maps(spec, data["val_pattern"], report_dir / "maps", args.seed)
    times["total_s"] = time.time() - t_start
    td, gain, loss = diversity_figures(manifest, maps, data, r), knn["trained"]["top1"] - knn["init"]["top1"], curves["loss"]
    recorded = manifest.to_dict()
    report = {
        "teacher": {"arch": args.teacher, "weights": weights, "about": got["about"]},
        "token_diversity": td, "cache": {k: recorded[k] for k in ("token_shape", "samples", "skipped", "codec")},
        "knn": knn, "knn_gain_top1": gain, "knn_during_training": curves["knn_curve"], "loss": loss, "data": data,
        "recipe": r, "lr": args.lr, "seed": args.seed, "encoder": got["exported"]["out"],
        "timm_snippet": got["exported"]["snippet"], "curves_png": str(report_dir / "curves.png"),
        "similarity_maps": {k: v for k, v in maps.items() if k != "token_diversity"}, "resumed": got["resumed"],
        "next_steps": next_steps(got["exported"]["out"], data),
        "seconds": {k: round(v, 1) for k, v in times.items()},
    }
    write_json_output(report_dir / "report.json", report)
    maps_line = (f"{len(maps['files'])} similarity maps of the teacher at {maps['size']} px: {report_dir / 'maps'}"
                 if "files" in maps else f"similarity maps skipped: {maps['skipped']}")
    print("token diversity of the teacher: " + "; ".join(
        f"TD = {f['value']:.4f} at {f['size_px']} px ({f['tokens_per_view']} tokens a view) over {f['images']}"
        for k, f in td.items() if k != "what"))
    print(f"k-NN top-1 on {data['val_images']} val images ({r['classes']} classes, chance {100 / r['classes']:.1f}%): "
          f"trained {knn['trained']['top1']:.2f}% vs init {knn['init']['top1']:.2f}% ({gain:+.2f}); teacher "
          f"{knn['teacher']['top1']:.2f}%\nloss {loss.get('first', float('nan')):.4f} -> "
          f"{loss.get('last', float('nan')):.4f} over {loss.get('steps')} steps, and k-NN during training: "
          f"{report_dir / 'curves.png'}\n{maps_line}\nreport: {report_dir / 'report.json'}\n"
          f"wall time {times['total_s']:.0f} s{' (this run, resumed)' if got['resumed'] else ''}", flush=True)
    note = quality_note(args.quick, r["steps"], gain)
    print((f"{note}\n" if note else "") + "next, MAE's evaluations of the exported student (README: Fine-tuning the "
          "exported encoder):\n" + "\n".join(f"  {c}" for c in report["next_steps"]), flush=True)


def quality_note(quick: bool, steps: int, gain: float) -> str:
    """What the k-NN gain over the init says of a run of `steps` (--quick: a check of the chain, not a result)."""
    if quick and gain > 0:
        return (f"note: --quick only checks the chain; the student beat its initialisation here ({gain:+.2f} points "
                f"after {steps} steps), but so short a run measures little (the default is 1000 steps)")
    if quick:
        return (f"note: --quick only checks the chain; {steps} steps were too few for the student to beat its "
                "initialisation on k-NN this time (the default 1000 steps do)")
    return "" if gain > 0 else "note: the trained student did not beat its initialisation this time; train longer (--steps)"


def next_steps(encoder: str, data: dict) -> list[str]:
    """`img2vec linprobe` and `img2vec finetune` on the exported student and the demo's shards, as they run: the probe
    with --blr raised for its small batch (MAE's base lr is for batch 16,384; README: Fine-tuning the exported
    encoder)."""
    shards = ["--train-shards", data["train_pattern"], "--val-shards", data["val_pattern"]]
    return [shlex.join(["img2vec", "linprobe", encoder, *shards, "--epochs", "10", "--batch-size", "64", "--blr", "20"]),
            shlex.join(["img2vec", "finetune", encoder, *shards, "--epochs", "10", "--batch-size", "64"])]
