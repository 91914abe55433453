"""Experiment trackers by name (`train.log_with = ["tensorboard", "wandb", ...]`): accelerate's trackers, each
logging the rows of `metrics.jsonl` at their step. A name accelerate does not know, or one whose package is not
installed (accelerate itself would only skip it), is a ConfigError before any step, naming what to install.
"""
from __future__ import annotations

import os
from pathlib import Path

from common.config import Config, ConfigError

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


def start_trackers(accelerator, cfg: Config) -> None:
    """Start `train.log_with`'s trackers on the main process (accelerate's init_trackers), with the config as
    their hyperparameters. W&B writes under the run dir unless WANDB_DIR says otherwise, named after it."""
    if not cfg.train.log_with:
        return
    run_dir = Path(cfg.train.run_dir)
    wandb = {k: v for k, v in (("dir", str(run_dir)), ("name", run_dir.name))
             if not os.environ.get(f"WANDB_{k.upper()}")}
    accelerator.init_trackers(PROJECT, config=hyperparameters(cfg), init_kwargs={"wandb": wandb})
