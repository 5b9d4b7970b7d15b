"""Rates with their sample size and a 95% Wilson interval."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Rate:
    k: int
    n: int

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")

    def wilson(self, z: float = 1.96) -> tuple[float, float]:
        if self.n == 0:
            return (float("nan"), float("nan"))
        p, n = self.value, self.n
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
        return (max(0.0, centre - half), min(1.0, centre + half))

    def to_dict(self) -> dict:
        lo, hi = self.wilson()
        return {**asdict(self), "rate": round(self.value, 4), "ci95": [round(lo, 4), round(hi, 4)]}

    def __str__(self) -> str:
        lo, hi = self.wilson()
        return f"{self.value:.3f} [{lo:.3f}, {hi:.3f}] (n={self.n})"
