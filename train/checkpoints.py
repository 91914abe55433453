"""Checkpoints you can trust: written whole or not at all, never non-finite, checked before use.

`<run_dir>/checkpoints/step_XXXXXXXX/` is written by accelerator.save_state under `.tmp`, then
`position.json` (step, epoch, world size, and every file's size) is written last and the directory
renamed. Before a resume, the newest checkpoint is checked (its files all there with their sizes,
weights loadable and finite, optimizer loadable, one RNG state per rank); a bad one is passed over
for the previous one with a warning naming what was wrong.
"""
from __future__ import annotations

import errno
import json
import shutil
import sys
from pathlib import Path

import torch

from common.config import ConfigError


class DiskFull(OSError):
    """No space left on the device while writing into the run dir; the message says what to do."""

    def __init__(self, what: str, path: Path):
        super().__init__(errno.ENOSPC, f"no space left on device while writing {what} {path}: free space or move "
                                       "train.run_dir, then rerun the same command (it resumes from the last checkpoint)")


class NonFinite(RuntimeError):
    """A non-finite loss or weight; nothing non-finite is written."""


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC as an OSError, or as safetensors' Rust error (`IoError(Os { code: 28, kind: StorageFull ...`)."""
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "StorageFull" in str(e) or "os error 28" in str(e)


def weights_are_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with a checkpoint directory, or None if it is complete and loadable (with one RNG state per
    rank of the run that wrote it: a resume may have another world size)."""
    from accelerate.utils import load
    from safetensors.torch import load_file

    try:
        position = json.loads((path / "position.json").read_text())
        step = int(position["step"])
    except FileNotFoundError:
        return "position.json is missing (the save did not finish)"
    except (ValueError, KeyError, TypeError) as e:
        return f"position.json is garbled ({type(e).__name__}: {e})"
    if path.name != f"step_{step:08d}":
        return f"position.json says step {step}"
    for rank in range(int(position.get("world_size", 1))):
        name = f"random_states_{rank}.pkl"
        try:
            rng = load(path / name)
            assert {"random_state", "numpy_random_seed", "torch_manual_seed"} <= set(rng)
        except FileNotFoundError:
            return f"the RNG state {name} of rank {rank} is missing"
        except Exception as e:  # noqa: BLE001 - any unreadable RNG state is the same problem
            return f"the RNG state {name} is garbled ({type(e).__name__})"
    for name, size in position.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    try:
        weights = load_file(path / "model.safetensors")
        torch.load(path / "optimizer.bin", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        return f"cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
    bad = [k for k, w in weights.items() if w.is_floating_point() and not torch.isfinite(w).all()]
    if bad:
        return f"weights are not finite ({', '.join(bad[:3])})"
    return None


class Checkpoints:
    """`<run_dir>/checkpoints/step_XXXXXXXX/` written by accelerator.save_state, renamed when complete."""

    def __init__(self, run_dir: Path, keep: int):
        self.dir, self.keep = run_dir / "checkpoints", keep

    def complete(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("step_*") if "." not in p.name)

    def latest(self) -> Path | None:
        done = [p for p in self.complete() if (p / "position.json").exists()]
        return done[-1] if done else None

    def latest_valid(self) -> Path | None:
        """The newest checkpoint that passes checkpoint_problem; passed-over ones are named on stderr.
        Checkpoints exist but none is usable: a ConfigError (starting over must be a decision)."""
        problems = []
        for path in reversed(self.complete()):
            problem = checkpoint_problem(path)
            if problem is None:
                for p in problems:
                    print(f"warning: not resuming from {p}; using {path.name}", file=sys.stderr)
                return path
            problems.append(f"{path}: {problem}")
        if problems:
            raise ConfigError("no usable checkpoint in " + str(self.dir) + ":\n  " + "\n  ".join(problems)
                              + "\nRestore one, or move the checkpoints away to start this run over.")
        return None

    def save(self, accelerator, step: int, position: dict) -> None:
        """Only finite weights are written; a full disk leaves no partial directory behind (DiskFull)."""
        model = accelerator._models[0] if accelerator._models else None  # the prepared student
        bad = torch.tensor(float(model is not None and not weights_are_finite(model)), device=accelerator.device)
        if accelerator.reduce(bad, "sum").item() > 0:  # on any rank
            raise NonFinite(f"the weights at step {step} are not finite: no checkpoint written, the last one kept "
                            f"({self.latest()})")
        final = self.dir / f"step_{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
                (tmp / "position.json").write_text(json.dumps(dict(position, world_size=accelerator.num_processes,
                                                                   files=files)))
        except Exception as e:
            if is_disk_full(e):
                shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the last checkpoint stays
                raise DiskFull("checkpoint", final) from None
            raise
        if accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self.complete()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

