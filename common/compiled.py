"""torch.compile for the student (`train.compile`) and the teacher (`teacher.compile`), eager where it cannot be.

`compile_forward(module, what)` replaces the module's `forward` by a compiled one, in place: its parameters, its
state-dict keys (no `_orig_mod.` prefix reaches a checkpoint or an export) and any DDP wrapper around it stay as they
are. Compilation happens at the first call; if it fails there (inductor needs a C compiler; an op it cannot lower),
a warning names the error and the module runs eager from then on. Only dynamo's and inductor's own errors fall back:
an error the model would raise eager too (a shape, out of memory) is raised as it is.
"""
from __future__ import annotations

import warnings

from torch import nn


def compile_forward(module: nn.Module, what: str) -> nn.Module:
    """`module` with its forward compiled by torch.compile (default backend, inductor), falling back to eager with
    a warning naming `what` and the error."""
    import torch
    from torch._dynamo.exc import TorchDynamoException

    eager = module.forward
    try:
        compiled = torch.compile(eager)
    except RuntimeError as e:  # a Python or platform torch.compile does not support
        _warn(what, e)
        return module

    failed = []  # module.forward stays this function: accelerate may have wrapped it (autocast) meanwhile

    def forward(*args, **kwargs):
        if not failed:
            try:
                return compiled(*args, **kwargs)
            except TorchDynamoException as e:
                _warn(what, e)
                failed.append(e)
        return eager(*args, **kwargs)

    module.forward = forward
    return module


def _warn(what: str, e: Exception) -> None:
    first = next((line for line in str(e).splitlines() if line.strip()), "")
    warnings.warn(f"{what}: torch.compile failed ({type(e).__name__}: {first[:300]}); running eager", RuntimeWarning,
                  stacklevel=3)
