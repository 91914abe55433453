"""Img2Vec losses (smooth L1 on masked teacher tokens and on the global vector) and target normalisation."""

import torch
import torch.nn.functional as F

TARGET_NORMS = ("none", "layernorm", "channel")


def smooth_l1(pred, target, beta):
    """Mean smooth L1: 0.5 x^2 / beta where |x| < beta, else |x| - 0.5 beta."""
    return F.smooth_l1_loss(pred.float(), target.float(), beta=beta)


def patch_loss(pred, target, mask, beta):
    """Smooth L1 averaged over the elements of the masked tokens only.

    pred, target: [N, T, C]; mask: [N, T] bool, True = masked (predicted) token.
    """
    per_token = F.smooth_l1_loss(pred.float(), target.float(), reduction="none", beta=beta).mean(-1)  # [N, T]
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def global_loss(pred, target, beta):
    """Smooth L1 between the student's global vector and the pooled teacher tokens. pred, target: [N, C]."""
    return smooth_l1(pred, target, beta)


def normalize_targets(tokens, mode, mean=None, var=None, eps=1e-6):
    """Normalise teacher tokens [N, T, C] (float32 out).

    "none": unchanged; "layernorm": per-token layer norm over C, no affine;
    "channel": standardise each channel with dataset statistics mean, var: [C].
    """
    tokens = tokens.float()
    if mode == "none":
        return tokens
    if mode == "layernorm":
        return F.layer_norm(tokens, tokens.shape[-1:], eps=eps)
    if mode == "channel":
        if mean is None or var is None:
            raise ValueError("target_norm 'channel' needs the cache's per-channel mean and var")
        mean = torch.as_tensor(mean, dtype=tokens.dtype, device=tokens.device)
        var = torch.as_tensor(var, dtype=tokens.dtype, device=tokens.device)
        return (tokens - mean) / torch.sqrt(var + eps)
    raise ValueError(f"unknown target_norm {mode!r}; choose one of {', '.join(TARGET_NORMS)}")
