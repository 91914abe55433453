"""FLOPs per view of a teacher's forward and of the student's training step, and the step speed-up a cache predicts.

Counted by torch.utils.flop_counter.FlopCounterMode, which counts 2 FLOPs per multiply-add (so ResNet-50's
"4.1 GFLOPs" of the literature read 8.2 here), as docs/BENCHMARKS.md does. The student is the recipe's
(pipeline.toml: `vit_<size>_patch16` or `_patch14`, mask ratio 0.6, decoder from the arch, head 2048 wide, targets of
the teacher's grid and width): one masked view forward and backward, batch 1. Online, every step also runs the
teacher's forward on the view; cached, it does not, so the step is (student + teacher) / student times cheaper.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode

STUDENT_SIZES = ("vit_base", "vit_large")  # the paper's students
PATCHES = (16, 14)                         # the students' patch sizes (train.model.STUDENTS)


@contextmanager
def counting():
    """FlopCounterMode with attention as matmuls: torch's counter has no formula for the CPU's fused attention kernel
    (it would count a ViT's attention as 0 there); the math kernel's two bmm per head are counted on any device."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as count:
        yield count


def teacher_flops(teacher, size: int) -> float:
    """FLOPs of one forward of `teacher` (a FrozenTeacher) on one uint8 view of `size` x `size` pixels."""
    device = next(iter(teacher.buffers())).device
    with counting() as count:
        teacher(torch.zeros(1, 3, size, size, dtype=torch.uint8, device=device))
    return float(count.get_total_flops())


def student_arch(size_name: str, stride: int) -> str | None:
    """The student of a size whose patch tiles tokens of `stride` pixels (vit_base, 32 -> vit_base_patch16;
    14 -> vit_base_patch14), None if no patch does."""
    patch = next((p for p in PATCHES if stride % p == 0), None)
    return f"{size_name}_patch{patch}" if patch else None


@functools.cache
def student_flops(arch: str, size: int, tokens: int, channels: int, device: str = "cpu") -> tuple[float, float]:
    """(forward, forward + backward) FLOPs of the recipe's student `arch` on one view of `size` pixels whose teacher
    gives `tokens` x `channels` targets. Built on the meta device and given constant weights: the count depends on
    shapes only, and a ViT-L's random init would cost more than the count."""
    from common.config import Config
    from train.model import build_student

    cfg = Config()
    cfg.student.arch = arch
    with torch.device("meta"):
        model = build_student(cfg, (tokens, channels), size)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.01)
    imgs, targets = torch.randn(1, 3, size, size, device=device), torch.randn(1, tokens, channels, device=device)
    with counting() as fwd:
        loss = model(imgs, targets)["loss"]
    with counting() as bwd:
        loss.backward()
    return float(fwd.get_total_flops()), float(fwd.get_total_flops() + bwd.get_total_flops())


def cache_speedups(teacher_gflops: float, stride: int, size: int, tokens: int, channels: int,
                   sizes=STUDENT_SIZES, device: str = "cpu") -> dict[str, dict]:
    """Per student size: its arch, its step's GFLOPs, and the predicted speed-up of a cached step over an online one,
    (student step + teacher forward) / student step; None where no student patch tiles the teacher's tokens."""
    out = {}
    for name in sizes:
        arch = student_arch(name, stride)
        if arch is None or size % stride:
            out[name] = None
            continue
        step = student_flops(arch, size, tokens, channels, str(device))[1] / 1e9
        out[name] = {"arch": arch, "step_gflops": step, "speedup": (step + teacher_gflops) / step}
    return out
