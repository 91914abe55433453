"""What `img2vec linprobe` and `img2vec finetune` share around their training: the command line, the output dir
that makes a run resumable, the cadence of epochs and the result (img2vec/supervised.py: the data, the schedule
and the top-1 inside it).

The output dir (`--out`, by default `<run dir>/<command>-<8 hex digits>`, a digest of the settings that decide the
result: so the same command finds its run again, and a sweep's other pool, lr, epochs or seed, or a later student
checkpoint, gets a dir of its own) is held as pretraining holds its run dir, with the same pieces (train/rundir.py,
train/checkpoints.py, common/signals.py): a lock; `run.json`, the run's identity (those settings: the command, the
student checkpoint, the shards' names, the seed, the arguments and the recipe; and the loader workers and the plan,
with the processes), which a rerun must match or is refused naming each difference (exit 2; the settings are
checked before the train shards are counted); `exit_status` ("running", then the exit status: behind a launcher,
what a job script reads); and `checkpoints/step_XXXXXXXX/`, accelerate's save_state (the trained weights, the
optimizer, every process's RNG states) renamed into place whole, with `position.json`: the update, the epochs' rows,
the epoch's loss so far and each process's place in its batch stream (supervised.FullBatches). One is written at
every epoch's end (before its evaluation), and at the update after which a stop signal ends the run: SIGTERM /
SIGUSR1 (exit 75) or SIGINT (130), to the main process or to the whole group (the loader workers ignore them),
agreed by every process in one all-reduce per update; one that comes while the shards are counted or the model is
built stops the run before its first update, one during an evaluation between two val batches (a resume evaluates
again). The same command resumes from the newest usable checkpoint and ends with the weights, rows and top-1 of a
run that was never stopped.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from common.config import ConfigError
from common.faults import fault_point
from common.runtime import write_json_output
from common.signals import StopSignals, status_of
from img2vec.supervised import FullBatches, LabelledImages, Plan, usable_workers
from shards.source import ShardError, expand_shards
from train.checkpoints import Checkpoints, DiskFull
from train.rundir import RunDirLock, check_identity, write_exit_status

KEEP = 2  # checkpoints kept in the output dir: the newest, and the one before in case it is damaged


class Stopped(Exception):
    """The run stopped on a signal after a checkpoint; `status` is its exit status (common/signals.py)."""

    def __init__(self, status: int):
        super().__init__(f"stopped: exit status {status}")
        self.status = status


# --------------------------------------------------------------------------------------------------------
# the output dir


SETTINGS = ("command", "student", "train_shards", "val_shards", "seed", "args", "recipe")  # run.json's, digested


def out_dir(args: argparse.Namespace, identity: dict) -> Path:
    """--out, or `<the student's run dir>/<command>-<8 hex digits of the identity's SETTINGS>` (not of the processes
    nor the loader workers: another number of those in the same dir is refused, as a resume it cannot be)."""
    from img2vec.evalsource import source_info

    if args.out:
        return Path(args.out)
    settings = json.dumps({k: identity[k] for k in SETTINGS}, sort_keys=True).encode()
    return Path(source_info(args.path)["run_dir"]) / f"{identity['command']}-{hashlib.sha256(settings).hexdigest()[:8]}"


def main_process() -> bool:
    return int(os.environ.get("RANK", 0)) == 0  # accelerate / torchrun set RANK


@contextmanager
def held(out: Path) -> Iterator[StopSignals]:
    """The output dir for one run: its lock and `exit_status` (the main process), and the stop signals' flag."""
    main, lock = main_process(), RunDirLock(out, other="another --out")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    status = 1
    try:
        with StopSignals() as stop:
            if main:
                write_exit_status(out, "running")
            yield stop
        status = 0
    except BaseException as e:
        status = error_status(e)
        raise
    finally:
        if main:
            write_exit_status(out, status)
        lock.release()


def error_status(e: BaseException) -> int:
    from img2vec.export import ExportError

    if isinstance(e, Stopped):
        return e.status
    if isinstance(e, KeyboardInterrupt):
        return status_of("SIGINT")
    return 2 if isinstance(e, (ConfigError, ExportError, ShardError)) else 3 if isinstance(e, DiskFull) else 1


def run_settings(command: str, args: argparse.Namespace, **recipe) -> dict:
    """What decides the result and is known before the shards are read (SETTINGS): the command, the student checkpoint,
    the shards' names (not where they are now), the seed, the arguments that set the recipe's numbers, the recipe.
    args.path is pinned to the student checkpoint: the run dir's latest one now, not one pretraining writes later
    (an exported file: itself, identified by its digest; img2vec/evalsource.py)."""
    from img2vec.evalsource import student_identity

    args.path, student = student_identity(args.path)
    given = {k: getattr(args, k) for k in ("epochs", "warmup_epochs", "batch_size", "blr", "num_classes")}
    return json.loads(json.dumps({  # as run.json gives it back (a tuple is a list)
        "command": command, "student": student, "train_shards": _names(args.train_shards),
        "val_shards": _names(args.val_shards), "seed": args.seed, "args": given, "recipe": recipe}))


def run_identity(settings: dict, args: argparse.Namespace, plan: Plan) -> dict:
    """What a resume must share with the run it resumes: the settings, and the loader workers and the plan (with
    the processes and the shards' count). Not --eval-every, --log-every."""
    return json.loads(json.dumps(dict(settings, loader_workers=usable_workers(args.workers), plan=plan.fields())))


def _names(pattern: str) -> dict:
    names = [Path(url).name for url in expand_shards(pattern)]
    return {"shards": len(names), "names_sha256": hashlib.sha256(json.dumps(names).encode()).hexdigest()}


def open_out(out: Path, settings: dict, given: bool) -> None:
    """The main process, before the shards are counted: which output dir, whether it resumes; a resume with other
    settings is refused now, not after a read of every train shard (check_identity on run.json with this run's
    settings in place of its own: the same refusal, naming each difference; run.json is written back as it was)."""
    resuming = bool(Checkpoints(out, KEEP).complete())
    print(f"output dir {out} ({'--out' if given else 'of these settings'}): "
          f"{'resuming the run it holds' if resuming else 'a new run'}")
    if resuming and (out / "run.json").is_file():
        recorded = json.loads((out / "run.json").read_text())
        check_identity(out, dict(recorded, **settings), {}, resuming=True, elastic=False, other="another --out")


def resume(accelerator, ckpts: Checkpoints, identity: dict) -> dict:
    """The main process checks the output dir's identity and picks its newest usable checkpoint; every process loads
    it. -> its position.json, with this process's place in its batch stream as "data" ({} for a fresh run)."""
    from accelerate.utils import broadcast_object_list

    latest = [None]
    if accelerator.is_main_process:
        out = ckpts.dir.parent
        out.mkdir(parents=True, exist_ok=True)
        check_identity(out, identity, {}, resuming=bool(ckpts.complete()), elastic=False, other="another --out")
        latest = [ckpts.latest_valid()]
    broadcast_object_list(latest)
    if latest[0] is None:
        return {}
    accelerator.load_state(str(latest[0]))
    at = json.loads((latest[0] / "position.json").read_text())
    accelerator.print(f"resuming from {latest[0]} at update {at['step']}", file=sys.stderr)
    return dict(at, data=at["data"][accelerator.process_index])


# --------------------------------------------------------------------------------------------------------
# the cadence


def train_epochs(accelerator, data: LabelledImages, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 scheduler, plan: Plan, evaluate: Callable[[], dict], args: argparse.Namespace, identity: dict,
                 stop: StopSignals | None = None) -> list[dict]:
    """The plan's epochs x updates (`step(images, labels)` -> its loss), the lr set before each, from the output dir's
    newest checkpoint on; one row per epoch (mean loss over processes, the epoch's last lr), a checkpoint, then
    `evaluate()` every --eval-every epochs (one a stop cut short is done at the resume). A stop signal: a checkpoint
    after the update in flight, then Stopped; one that came before (the shards' count, the model's build): Stopped."""
    if agree(accelerator, torch.zeros((), device=accelerator.device), stop, -1):  # as between updates
        received = stop.received if stop else None
        accelerator.print(f"stopping before the first update on {received or 'a signal to another process'}: "
                          "rerun the same command", file=sys.stderr)
        raise Stopped(status_of(received))
    ckpts = Checkpoints(out_dir(args, identity), KEEP)
    at = resume(accelerator, ckpts, identity)
    i, history, per_epoch = at.get("step", 0), at.get("history", []), plan.steps_per_epoch
    if history and evaluation_due(history[-1], args, plan):
        close_epoch(accelerator, history[-1], evaluate, args, plan)
    batches = FullBatches(data, plan.batch_size, args.workers, at.get("data"))
    total, t0 = torch.tensor(at.get("loss_sum", 0.0), device=accelerator.device), time.perf_counter()
    bar = tqdm(total=plan.epochs * per_epoch, initial=i, unit="update", dynamic_ncols=True,
               disable=args.no_progress or not accelerator.is_main_process)
    while i < plan.epochs * per_epoch:
        epoch = i // per_epoch + 1
        scheduler.step_update(i)
        images, labels = next(batches)
        loss = step(images.to(accelerator.device, non_blocking=True), labels.to(accelerator.device, non_blocking=True))
        stopping = agree(accelerator, loss, stop, i)
        total += loss.detach()
        i += 1
        bar.update()
        if args.log_every and i % args.log_every == 0:
            (accelerator.print if bar.disable else bar.write)(  # above the bar, not through it
                f"  epoch {epoch} update {i}: loss {loss.item():.4f}, lr {_lr(scheduler):.3g}")
        if i % per_epoch == 0:
            history.append({"epoch": epoch, "loss": accelerator.reduce(total, "mean").item() / per_epoch,
                            "lr": _lr(scheduler), "seconds": round(time.perf_counter() - t0, 2)})
            total = torch.zeros_like(total)
        if i % per_epoch == 0 or stopping:
            checkpoint(accelerator, ckpts, i, batches, history, total)
        if i % per_epoch == 0 and not stopping:  # after the checkpoint: a stop during the evaluation loses no update
            close_epoch(accelerator, history[-1], evaluate, args, plan)
            t0 = time.perf_counter()
        fault_point("step", str(i))
        if stopping:
            bar.close()
            received = stop.received if stop else None
            accelerator.print(f"stopping at update {i} (epoch {epoch}) on {received or 'a signal to another process'}: "
                              f"checkpoint {ckpts.latest()}; rerun the same command to resume", file=sys.stderr)
            raise Stopped(status_of(received))
    bar.close()
    return history


def evaluation_due(row: dict, args: argparse.Namespace, plan: Plan) -> bool:
    """Does the epoch of `row` take an evaluation (every --eval-every epochs, but the last: the result's) not done?"""
    return bool(args.eval_every) and row["epoch"] % args.eval_every == 0 and row["epoch"] < plan.epochs \
        and "top1" not in row


def close_epoch(accelerator, row: dict, evaluate: Callable[[], dict], args: argparse.Namespace, plan: Plan) -> None:
    """The epoch's row, with its evaluation when due, printed."""
    if evaluation_due(row, args, plan):
        row.update(evaluate())
    accelerator.print(f"epoch {row['epoch']}/{plan.epochs}: "
                      + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"))


def halt(stop: StopSignals | None) -> None:
    """Between two val batches: a stop signal ends the run here, on this process (one that did not get it waits at
    the evaluation's sum until the launcher ends it). Nothing is lost: the epoch's checkpoint was written before its
    evaluation, and a resume evaluates again."""
    if stop is not None and stop.requested:
        print(f"stopping during an evaluation on {stop.received}: rerun the same command to resume", file=sys.stderr)
        raise Stopped(stop.status)


def agree(accelerator, loss: torch.Tensor, stop: StopSignals | None, i: int) -> bool:
    """Stop after this update? Asked on any process; in the same all-reduce, a loss not finite on any process stops
    every process with an error (none stops alone: the others would wait for it at the next collective)."""
    flags = torch.stack([(~torch.isfinite(loss.detach())).float(),
                         torch.tensor(float(stop is not None and stop.requested), device=loss.device)])
    nonfinite, stopping = (accelerator.reduce(flags, "sum") > 0).tolist()
    if nonfinite:
        raise FloatingPointError(f"the loss of update {i + 1} is not finite (here: {loss.item()}): stopping")
    return stopping


def checkpoint(accelerator, ckpts: Checkpoints, step: int, batches: FullBatches, history: list[dict],
               total: torch.Tensor) -> None:
    """A checkpoint after `step` updates: the weights, optimizer and RNGs, the rows, the epoch's loss so far (its mean
    over processes) and every process's place in its batch stream."""
    from accelerate.utils import gather_object

    places = gather_object([batches.position()])
    loss_sum = accelerator.reduce(total.clone(), "mean").item()
    ckpts.save(accelerator, step, {"step": step, "data": places, "history": history, "loss_sum": loss_sum})


def update(accelerator, optimizer, loss: torch.Tensor) -> torch.Tensor:
    """One optimizer update from `loss` (gradients synchronised by accelerate's DDP); -> the loss."""
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    optimizer.step()
    return loss


def _lr(scheduler) -> float:
    """The lr of the group without layer decay (the head's)."""
    return max(g["lr"] for g in scheduler.optimizer.param_groups)


# --------------------------------------------------------------------------------------------------------
# command line and result


def make_parser(prog: str, description: str, doc: str, batch_size: int) -> argparse.ArgumentParser:
    """The arguments both commands take; `doc` (the module's docstring) ends with the usage examples."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n" + doc.rstrip().rsplit("\n\n", 1)[1])
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a training run dir (its latest complete checkpoint), a checkpoints/step_XXXXXXXX dir or a file "
                        "written by `img2vec export` (then its folder stands in for RUN_DIR below)")
    p.add_argument("--train-shards", required=True, metavar="PATTERN", help="labelled (.cls) train shards, brace pattern")
    p.add_argument("--val-shards", required=True, metavar="PATTERN", help="labelled (.cls) val shards, brace pattern")
    p.add_argument("--epochs", type=int, help="epochs (default: the recipe's)")
    p.add_argument("--warmup-epochs", type=float,
                   help="epochs of linear warmup from 0 (default: the recipe's share of --epochs)")
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"images per process and update ({batch_size}); the lr scales with processes x batch / 256")
    p.add_argument("--blr", type=float, help="base lr per 256 images (default: the recipe's)")
    p.add_argument("--num-classes", type=int, help="classifier outputs (default: the train shards' largest label + 1)")
    p.add_argument("--workers", type=int, default=usable_workers(10),
                   help=f"DataLoader workers per process ({usable_workers(10)}: MAE's 10, at most one per CPU this "
                        "process may use)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0, metavar="EPOCHS",
                   help="also evaluate every N epochs (0: only after the last)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log-every", type=int, default=50, metavar="UPDATES", help="print the loss every N updates (0: off)")
    p.add_argument("--json", metavar="FILE", help="also write the result here (it is always written into the run dir)")
    p.add_argument("--out", metavar="DIR", help=f"the checkpoints, kept so that the same command resumes a stopped run "
                   f"(default: RUN_DIR/{prog.split()[-1]}-XXXXXXXX, 8 hex digits of a digest of the settings that "
                   "decide the result: the student checkpoint, the shards' names, the seed, the recipe and the "
                   "arguments that change it)")
    return p


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.batch_size < 1 or (args.epochs is not None and args.epochs < 1) or args.workers < 0:
        p.error("--batch-size and --epochs must be >= 1, --workers >= 0")
    if args.warmup_epochs is not None and args.warmup_epochs < 0:
        p.error("--warmup-epochs must be >= 0")


def start(seed: int):
    """The Accelerator (one process, or accelerate launch's), every RNG seeded with seed + rank, as MAE."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator()
    set_seed(seed + accelerator.process_index)
    return accelerator


def result_fields(info: dict, evaluation: dict, plan: Plan, history: list[dict], t0: float, **more) -> dict:
    """The result JSON: the student, the top-1, the plan, what the command adds, the epochs' rows."""
    return {**{k: info[k] for k in ("arch", "img_size", "run_dir", "checkpoint", "step")}, **evaluation, **plan.fields(),
            **more, "history": history, "seconds": round(time.perf_counter() - t0, 2)}


def finish(result: dict, name: str, json_out: str | None) -> None:
    """Print the top-1 and write the result as `<run dir>/<name>.json` (for an exported file `<its stem>.<name>.json`
    beside it) and --json, from the main process."""
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    top5 = f", top-5 {result['top5']:.2f}%" if "top5" in result else ""
    print(f"{name} of {result['arch']} (pretraining step {result['step']}): top-1 {result['top1']:.2f}%{top5} "
          f"({result['val_samples']} val images, {result['classes']} classes; {result['epochs']} epochs of "
          f"{result['steps_per_epoch']} updates, batch {result['global_batch']})")
    exported = Path(result["checkpoint"])  # an exported file: its own result, beside it (two in a folder: two)
    own = exported.with_name(f"{exported.stem}.{name}.json") if exported.is_file() else \
        Path(result["run_dir"]) / f"{name}.json"
    for path in [own, *([json_out] if json_out else [])]:
        write_json_output(path, result)
    print(f"  -> {own}")


def run_command(train: Callable[..., tuple[dict, torch.nn.Module]], settings: Callable[[argparse.Namespace], dict],
                args: argparse.Namespace, name: str, prog: str) -> int:
    """train(args, stop) holding the output dir (out_dir of `settings(args)`), then finish; an error a user can act on
    (a shard, a run dir, an argument, a resume with other settings) is one line, exit 2; a full disk 3; a stop 75
    (130 on SIGINT)."""
    from img2vec.export import ExportError

    try:
        key = settings(args)
        out = out_dir(args, key)
        with held(out) as stop:
            if main_process():
                open_out(out, key, bool(args.out))
            finish(train(args, stop)[0], name, args.json)
    except Stopped as e:
        return e.status
    except DiskFull as e:
        print(f"{prog}: error: {e.strerror}", file=sys.stderr)
        return 3
    except (ConfigError, ExportError, ShardError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
