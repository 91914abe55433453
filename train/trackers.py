"""Experiment trackers by name (`train.log_with = ["tensorboard", "wandb", ...]`): accelerate's trackers, each
logging the rows of `metrics.jsonl` at their step. A name accelerate does not know, or one whose package is not
installed (accelerate itself would only skip it), is a ConfigError before any step, naming what to install.
W&B's run id belongs to the run dir (`<run_dir>/wandb_run_id`): a resumed training continues the same W&B run.
"""
from __future__ import annotations

import os
import secrets
import string
import sys
from pathlib import Path

from common.config import Config, ConfigError
from train.rundir import write_text

PROJECT = "img2vec"  # the trackers' project: TensorBoard writes <run_dir>/img2vec/, W&B's project is named so

PACKAGES = {  # accelerate's tracker name -> (its pip package, this project's extra that installs it, if any)
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", None),
    "comet_ml": ("comet-ml", None),
    "aim": ("aim", None),
    "clearml": ("clearml", None),
    "dvclive": ("dvclive", None),
    "swanlab": ("swanlab", None),
    "trackio": ("trackio", None),
}


def check_trackers(names: list[str]) -> None:
    """Every name one of accelerate's trackers, with its package importable."""
    import accelerate
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"train.log_with: unknown tracker {name!r} (accelerate {accelerate.__version__} has "
                              f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))})")
        if name not in available:
            package, extra = PACKAGES.get(name, (name, None))
            how = f"pip install -e '.[{extra}]' (or pip install {package})" if extra else f"pip install {package}"
            raise ConfigError(f"train.log_with: the {name!r} tracker needs the {package} package, which is not "
                              f"installed: {how}")


def hyperparameters(cfg: Config) -> dict:
    """The config as flat `section.key` scalars (lists as text), as TensorBoard's hparams take them."""
    return {f"{section}.{key}": v if isinstance(v, (int, float, str, bool)) else str(v)
            for section, keys in cfg.to_dict().items() for key, v in keys.items()}


WANDB_RUN_ID = "wandb_run_id"  # <run_dir>/wandb_run_id: the W&B run this run dir logs to
ID_CHARS = string.ascii_lowercase + string.digits  # as wandb.util.generate_id draws them


def wandb_run_id(run_dir: Path, resuming: bool) -> str:
    """The run dir's W&B run id: the one recorded in `<run_dir>/wandb_run_id` when resuming from a checkpoint; a new
    one, recorded there (atomically), when the run starts from step 0 (its first start, or a rerun of a run killed
    before its first checkpoint: its metrics rows are dropped, so is its W&B run)."""
    path = run_dir / WANDB_RUN_ID
    if resuming and path.exists():
        recorded = path.read_text().strip()
        if recorded:
            return recorded
        print(f"warning: {path} is empty: this run logs to a new W&B run", file=sys.stderr)
    run_id = "".join(secrets.choice(ID_CHARS) for _ in range(8))
    write_text(path, run_id + "\n", "W&B run id")
    return run_id


def wandb_init_kwargs(run_dir: Path, step: int) -> dict:
    """wandb.init's arguments (accelerate's WandBTracker passes them on): the run dir's W&B run id with resume="allow",
    so that every start of the run logs to one W&B run (its rows continue at the resumed step); W&B writes under the
    run dir, the run named after it. A WANDB_RUN_ID, WANDB_RESUME, WANDB_DIR or WANDB_NAME set in the environment wins."""
    kwargs = {k: v for k, v in (("dir", str(run_dir)), ("name", run_dir.name)) if not os.environ.get(f"WANDB_{k.upper()}")}
    if not os.environ.get("WANDB_RUN_ID"):
        kwargs["id"] = wandb_run_id(run_dir, resuming=step > 0)
    if not os.environ.get("WANDB_RESUME"):
        kwargs["resume"] = "allow"
    return kwargs


def start_trackers(accelerator, cfg: Config, step: int) -> None:
    """Start `train.log_with`'s trackers on the main process (accelerate's init_trackers), with the config as
    their hyperparameters; `step` is the one resumed from (0: a fresh start). A killed run may have logged steps past
    its last checkpoint: the resumed run logs them again, and TensorBoard keeps the new ones (its purge_step; it
    would otherwise show the last such step twice). W&B keeps the first ones and ignores steps logged again."""
    if not cfg.train.log_with:
        return
    init_kwargs = {"tensorboard": {"purge_step": step + 1}}  # events past `step` dropped, as metrics.jsonl's rows
    if "wandb" in cfg.train.log_with and accelerator.is_main_process:
        init_kwargs["wandb"] = wandb_init_kwargs(Path(cfg.train.run_dir), step)
    accelerator.init_trackers(PROJECT, config=hyperparameters(cfg), init_kwargs=init_kwargs)
