"""What every process asks of its surroundings, answered once: which device, which seed, which share of
the work a DataLoader worker takes, and where a command's `--json` result goes."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch


def pick_device(name: str = "auto") -> torch.device:
    """"auto": this process's own GPU (LOCAL_RANK from torchrun/accelerate, SLURM_LOCALID), else the CPU.
    Any other name is torch's ("cpu", "cuda", "cuda:1")."""
    if name != "auto":
        return torch.device(name)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    return torch.device("cuda", local % torch.cuda.device_count())


def seed_from(*parts) -> int:
    """A 64-bit seed named by its parts, e.g. (seed, key, view): sha256 of their "/"-joined text, so it is the
    same in every process, run and Python version (`hash()` is salted per process)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


def worker_slice(items):
    """This DataLoader worker's share of `items` (every num_workers-th, from its id); all of them outside a
    worker. Workers of an IterableDataset each run the whole `__iter__`: without this they repeat each other."""
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info else (0, 1)
    return items[wid::nw]


def write_json_output(path: str | Path, result) -> None:
    """A command's `--json OUT`: the result as JSON (indent 1), written atomically, its folder made if need be."""
    from common.files import write_json_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)
