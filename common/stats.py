"""Token diversity (the paper's teacher-selection metric) and running channel statistics."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def token_diversity_per_image(tokens: torch.Tensor) -> torch.Tensor:
    """tokens [N, K, C] -> TD of each image [N]:  1 - 1/(K(K-1)) sum_{i != k} cos(t_i, t_k).

    Uses sum_{i != k} u_i.u_k = |sum_i u_i|^2 - sum_i |u_i|^2 for unit vectors u (zero tokens stay 0).
    """
    u = F.normalize(tokens.float(), dim=-1)
    k = u.shape[1]
    s = u.sum(1)
    off_diag = (s * s).sum(-1) - (u * u).sum((1, 2))
    return 1.0 - off_diag / (k * (k - 1))


def token_diversity(tokens: torch.Tensor) -> float:
    """The paper's TD over N images (Pan et al., 2023; see token_diversity_per_image): the mean of the
    per-image values."""
    return float(token_diversity_per_image(tokens).mean())


class TokenStats:
    """Per-channel count / sum / sum of squares (float64) and the TD sum over views; mergeable."""

    def __init__(self, channels: int = 0):
        self.count = 0
        self.sum = np.zeros(channels)
        self.sumsq = np.zeros(channels)
        self.td_sum = 0.0
        self.td_count = 0

    @staticmethod
    def partial(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """The sums of tokens [N, T, C] (one row per view), as tensors on their device: `add` them on the host
        later, so a GPU extraction need not wait for them."""
        flat = tokens.reshape(-1, tokens.shape[-1]).double()
        return {"sum": flat.sum(0), "sumsq": (flat * flat).sum(0), "td": token_diversity_per_image(tokens).double().sum(),
                "tokens": torch.tensor(flat.shape[0]), "views": torch.tensor(tokens.shape[0])}

    def add(self, part: dict[str, torch.Tensor]) -> None:
        if not self.sum.size:
            self.sum, self.sumsq = np.zeros(part["sum"].shape[0]), np.zeros(part["sum"].shape[0])
        self.count += int(part["tokens"])
        self.sum += part["sum"].cpu().numpy()
        self.sumsq += part["sumsq"].cpu().numpy()
        self.td_sum += float(part["td"])
        self.td_count += int(part["views"])

    def update(self, tokens: torch.Tensor) -> None:
        """tokens [N, T, C], one row per view."""
        self.add(self.partial(tokens))

    def merge(self, other: TokenStats) -> TokenStats:
        if not self.sum.size:
            self.sum, self.sumsq = np.zeros_like(other.sum), np.zeros_like(other.sumsq)
        if other.count:
            self.sum += other.sum
            self.sumsq += other.sumsq
        self.count += other.count
        self.td_sum += other.td_sum
        self.td_count += other.td_count
        return self

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    @property
    def var(self) -> np.ndarray:
        return np.maximum(self.sumsq / max(self.count, 1) - self.mean ** 2, 0.0)

    @property
    def diversity(self) -> float:
        return self.td_sum / max(self.td_count, 1)

    def to_dict(self) -> dict:
        return {"count": self.count, "sum": self.sum.tolist(), "sumsq": self.sumsq.tolist(),
                "td_sum": self.td_sum, "td_count": self.td_count}

    @classmethod
    def from_dict(cls, d: dict) -> TokenStats:
        s = cls()
        s.count, s.td_sum, s.td_count = d["count"], d["td_sum"], d["td_count"]
        s.sum, s.sumsq = np.asarray(d["sum"], np.float64), np.asarray(d["sumsq"], np.float64)
        return s
