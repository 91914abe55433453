"""common/augment.py as a specification: the crop sampler is torchvision's RandomResizedCrop.get_params fed the
same random numbers, views are deterministic per (seed, key, view), and the view order covers every view."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.transforms as tv

from common.augment import random_resized_crop_box, sample_views, view_order


class RecordingTorch:
    """Stands in for `torch` inside torchvision's transforms module: the real draws, each one recorded as
    (kind, low, high, value) in call order."""

    def __init__(self):
        self.draws: list[tuple[str, float, float, float]] = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty(self, *size, **kw):
        draws, t = self.draws, torch.empty(*size, **kw)

        class Uniform:  # torch.empty(1).uniform_(lo, hi): the only use get_params makes of empty
            @staticmethod
            def uniform_(lo, hi):
                t.uniform_(lo, hi)
                draws.append(("uniform", float(lo), float(hi), t.item()))
                return t

        return Uniform()

    def randint(self, low, high, size, **kw):
        t = torch.randint(low, high, size, **kw)
        self.draws.append(("integers", low, high, t.item()))
        return t


class Replay:
    """A numpy-Generator look-alike that returns the recorded draws in order, checking each call asks for the same
    kind of number over the same range (integer ranges exactly: they carry the crop's height and width)."""

    def __init__(self, draws):
        self.draws, self.at = draws, 0

    def _next(self, kind, low, high):
        assert self.at < len(self.draws), f"draw {self.at}: ours draws more numbers than torchvision"
        k, lo, hi, value = self.draws[self.at]
        self.at += 1
        assert k == kind, (self.at, k, kind)
        if kind == "integers":
            assert (lo, hi) == (low, high), (self.at, (lo, hi), (low, high))
        else:  # torchvision's bounds are float32 (log of the ratio as a float32 tensor)
            assert math.isclose(lo, low, rel_tol=1e-6) and math.isclose(hi, high, rel_tol=1e-6), (self.at, lo, hi)
        return value

    def uniform(self, low, high):
        return self._next("uniform", low, high)

    def integers(self, low, high):
        return self._next("integers", low, high)


def both(monkeypatch, height, width, scale, ratio):
    """(torchvision's box, ours given the same numbers, whether torchvision fell back to the central crop)."""
    rec = RecordingTorch()
    monkeypatch.setattr(tv, "torch", rec)
    theirs = tv.RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale), list(ratio))
    monkeypatch.setattr(tv, "torch", torch)
    replay = Replay(rec.draws)
    ours = random_resized_crop_box(replay, height, width, tuple(scale), tuple(ratio))
    assert replay.at == len(rec.draws), "ours draws fewer numbers than torchvision"
    return tuple(theirs), ours, not any(d[0] == "integers" for d in rec.draws)


SCALES = [(0.2, 1.0), (0.08, 1.0), (0.9, 1.0), (1.0, 1.0), (0.01, 0.05)]
RATIOS = [(3 / 4, 4 / 3), (1.0, 1.0), (0.5, 2.0), (1 / 3, 3.0)]


def test_crop_box_is_torchvisions_get_params_given_the_same_numbers(monkeypatch):
    """2,000 images of random sizes (thin strips included) x 5 scales x 4 ratios: the same (top, left, h, w) as
    torchvision for the same uniform and integer draws, through all three branches of the central-crop fallback."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    fallbacks = {"tall": 0, "wide": 0, "whole": 0}
    samples = 0
    for i in range(2000):
        if i % 4 == 0:  # strips: few of the 10 tries fit, so the fallback runs
            h, w = (int(rng.integers(200, 600)), int(rng.integers(1, 40)))[:: 1 if i % 8 else -1]
        else:
            h, w = int(rng.integers(1, 600)), int(rng.integers(1, 600))
        scale, ratio = SCALES[i % len(SCALES)], RATIOS[(i // len(SCALES)) % len(RATIOS)]
        theirs, ours, fell_back = both(monkeypatch, h, w, scale, ratio)
        assert ours == theirs, (h, w, scale, ratio)
        top, left, ch, cw = ours
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch >= 1 and cw >= 1
        samples += not fell_back
        if fell_back:
            fallbacks["tall" if w / h < min(ratio) else "wide" if w / h > max(ratio) else "whole"] += 1
    assert all(n >= 10 for n in fallbacks.values()) and samples >= 500, (fallbacks, samples)


def test_only_departure_from_torchvision_is_a_crop_never_empty(monkeypatch):
    """A ratio range far from the image's (here 10..20 on a 5 x 5 image) makes torchvision's fallback round the
    crop's height to 0 rows; ours keeps one row (the same centre, the same width)."""
    theirs, ours, fell_back = both(monkeypatch, 5, 5, (0.9, 1.0), (10.0, 20.0))
    assert fell_back and theirs == (2, 0, 0, 5) and ours == (2, 0, 1, 5)


def test_views_are_deterministic_and_inside_the_image():
    a = sample_views(seed=0, key="k1", height=120, width=300, views=8)
    assert (a == sample_views(seed=0, key="k1", height=120, width=300, views=8)).all()
    assert not (a == sample_views(seed=1, key="k1", height=120, width=300, views=8)).all()
    top, left, h, w, flip = a.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 120).all() and (left + w <= 300).all()
    assert set(flip) <= {0, 1}


def test_a_view_depends_on_seed_key_and_its_index_only():
    """View v of an image is the same whether 3 or 8 views are drawn, and another key draws other views."""
    eight = sample_views(seed=3, key="n01/img.jpg", height=375, width=500, views=8)
    assert (sample_views(seed=3, key="n01/img.jpg", height=375, width=500, views=3) == eight[:3]).all()
    assert not (sample_views(seed=3, key="n01/img.jpeg", height=375, width=500, views=8) == eight).all()


@pytest.mark.parametrize("scale,ratio", [(0.25, 1.0), (0.5, 2.0), (0.3, 0.75)])
def test_a_fixed_scale_and_ratio_give_the_formulas_box(scale, ratio):
    """With the ranges pinned to one value the first try always fits: w = round(sqrt(A s r)), h = round(sqrt(A s / r)),
    and the box lies inside the image."""
    height, width = 400, 600
    w, h = round(math.sqrt(height * width * scale * ratio)), round(math.sqrt(height * width * scale / ratio))
    views = sample_views(seed=0, key="k", height=height, width=width, views=50, scale=(scale, scale), ratio=(ratio, ratio))
    assert (views[:, 2] == h).all() and (views[:, 3] == w).all()
    assert (views[:, 0] <= height - h).all() and (views[:, 1] <= width - w).all()
    assert len(set(map(tuple, views[:, :2].tolist()))) > 40  # the corner is drawn: (almost) never twice the same


def test_flip_follows_its_probability():
    views = 2000
    assert not sample_views(seed=0, key="k", height=64, width=64, views=20, flip=0.0)[:, 4].any()
    assert sample_views(seed=0, key="k", height=64, width=64, views=20, flip=1.0)[:, 4].all()
    rate = sample_views(seed=0, key="k", height=64, width=64, views=views, flip=0.5)[:, 4].mean()
    assert abs(rate - 0.5) < 4 * math.sqrt(0.25 / views)  # within 4 sigma of a fair coin


@pytest.mark.parametrize("views", [1, 3, 8])
def test_view_order_sees_every_view_once_before_any_repeats(views):
    orders = {tuple(view_order(0, f"key{i}", views)) for i in range(40)}
    assert all(sorted(o) == list(range(views)) for o in orders)
    assert (view_order(0, "key0", views) == view_order(0, "key0", views)).all()
    if views <= 3:  # 40 keys draw every possible order
        assert len(orders) == math.factorial(views)
    else:  # 8! orders: 40 keys, (almost) all different
        assert len(orders) > 30
