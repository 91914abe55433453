"""Block masking in teacher-token units: one unit = one teacher token = unit x unit student patches."""

import torch

from common.runtime import seed_from


def unit_mask(batch, grid_h, grid_w, ratio, generator=None, device=None):
    """Random unit mask, True = masked: exactly round(ratio * grid_h * grid_w) units in every image.

    Returns mask_units: [N, grid_h * grid_w] bool, row-major over the teacher's token grid.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1], got {ratio}")
    num_units = grid_h * grid_w
    num_masked = int(round(ratio * num_units))
    if generator is not None:
        device = generator.device
    noise = torch.rand(batch, num_units, generator=generator, device=device)  # [N, T]
    ids_shuffle = torch.argsort(noise, dim=1)  # the first num_masked units of each row are masked
    mask = torch.zeros(batch, num_units, dtype=torch.bool, device=noise.device)
    mask.scatter_(1, ids_shuffle[:, :num_masked], True)
    return mask


def units_to_patches(unit_mask, grid_h, grid_w, unit):
    """Upsample a unit mask [N, grid_h * grid_w] to the patch mask [N, (grid_h*unit) * (grid_w*unit)]."""
    n = unit_mask.shape[0]
    m = unit_mask.reshape(n, grid_h, 1, grid_w, 1).expand(n, grid_h, unit, grid_w, unit)
    return m.reshape(n, grid_h * unit * grid_w * unit)  # row-major patch order


def step_generator(seed: int, rank: int, batch_index: int) -> torch.Generator:
    """The generator of one rank's masks for one batch, seeded by (seed, rank, batch) alone: a resumed run, the
    online-teacher baseline and the uninterrupted run draw the same masks for a batch; every rank its own."""
    return torch.Generator().manual_seed(seed_from(seed, "mask", rank, batch_index) >> 1)
