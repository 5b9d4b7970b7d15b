"""Rates with their sample size and a 95% Wilson interval; paired tests and a paired bootstrap of two rows' verdicts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, NamedTuple


@dataclass(frozen=True)
class Rate:
    """k of n; `unparsed` items (a judge answer that could not be read) are outside n and reported beside it."""

    k: int
    n: int
    unparsed: int = 0

    @classmethod
    def of(cls, flags: Iterable[bool | None]) -> "Rate":
        """The rate of True among the flags that are not None; the None ones are counted as unparsed."""
        flags = list(flags)
        return cls(sum(f is True for f in flags), sum(f is not None for f in flags), sum(f is None for f in flags))

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
        return f"{self.value:.3f} [{lo:.3f}, {hi:.3f}] ({format_n(self.n, self.unparsed)})"


def format_n(n: int, unparsed: int = 0) -> str:
    """'n=61', or 'n=61, 3 unparsed' where a judge could not read some answers."""
    return f"n={n}" + (f", {unparsed} unparsed" if unparsed else "")


def cohen_kappa(a: list[bool], b: list[bool]) -> float | None:
    """Cohen's κ of two binary raters on the same items: agreement beyond what their base rates give by chance.

    None when undefined (no items, or both raters constant and equal, where chance agreement is 1)."""
    n = len(a)
    if n != len(b):
        raise ValueError(f"κ needs the same items: {n} vs {len(b)} verdicts")
    if n == 0:
        return None
    po = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(a) / n, sum(b) / n
    pe = pa * pb + (1 - pa) * (1 - pb)
    return None if pe >= 1 else (po - pe) / (1 - pe)


def roc_auc(scores: list[float], labels: list[bool]) -> float | None:
    """Area under the ROC curve (probability a random positive outscores a random negative; ties count half)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    ranked = sorted((s, i) for i, s in enumerate(scores))
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(ranked):  # average ranks over ties
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[ranked[k][1]] = (i + j) / 2 + 1
        i = j + 1
    rank_pos = sum(r for r, y in zip(ranks, labels) if y)
    return (rank_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def mcnemar_exact(before: Iterable[bool | None], after: Iterable[bool | None]) -> dict:
    """Exact two-sided McNemar test of a change on the same items: of the items that changed (b went from True to
    False, c from False to True), is the split further from even than chance? Items without a verdict on either
    side are left out. Returns the counts and the p-value (1.0 when nothing changed)."""
    pairs = [(x, y) for x, y in zip(before, after) if x is not None and y is not None]
    b = sum(x and not y for x, y in pairs)
    c = sum(y and not x for x, y in pairs)
    n = b + c
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n if n else 1.0
    return {"n": len(pairs), "true_to_false": b, "false_to_true": c, "p_value": float(f"{min(1.0, 2 * tail):.4g}")}


class Recovered(NamedTuple):
    """A recovered share with its percentile interval; `resamples` of the bootstrap's draws had it defined."""

    point: float
    lo: float | None
    hi: float | None
    resamples: int


def bootstrap_recovery(a_bits: Iterable[bool | None], t_bits: Iterable[bool | None], m_bits: Iterable[bool | None],
                       n_boot: int = 2000, seed: int = 0) -> Recovered | None:
    """(HR_T − HR_m) / (HR_T − HR_A) with a 95% paired-bootstrap interval, from per-prompt harmful verdicts of A, T
    and the method on the same prompts, in the same order (None: unparsed).

    One draw of prompt indices serves all three rows, so the interval keeps their pairing: a prompt every model
    fails moves numerator and denominator together instead of widening the interval. Each rate leaves out its own
    row's unparsed verdicts, as the table's rates do. A draw where HR_T = HR_A (or a row has no parsed verdict) has
    no share and is skipped; `resamples` says how many were left. None when HR_T = HR_A on the prompts themselves."""
    import numpy as np

    rows = [list(b) for b in (a_bits, t_bits, m_bits)]
    n = len(rows[0])
    if any(len(r) != n for r in rows):
        raise ValueError(f"a paired bootstrap needs the same prompts: {[len(r) for r in rows]} verdicts")
    known = np.array([[x is not None for x in r] for r in rows], dtype=np.int64)
    harmful = np.array([[x is True for x in r] for r in rows], dtype=np.int64)

    def share(k: "np.ndarray", c: "np.ndarray") -> "np.ndarray":
        # rows x draws; nan where a row has no parsed verdict or A and T tie
        with np.errstate(divide="ignore", invalid="ignore"):
            hr_a, hr_t, hr_m = k / c
            return np.where(hr_t != hr_a, (hr_t - hr_m) / (hr_t - hr_a), np.nan)

    if n == 0:
        return None
    point = float(share(harmful.sum(1)[:, None], known.sum(1)[:, None])[0])
    if math.isnan(point):
        return None
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    draws = share(harmful[:, idx].sum(2), known[:, idx].sum(2))
    draws = draws[~np.isnan(draws)]
    if not draws.size:
        return Recovered(point, None, None, 0)
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return Recovered(point, float(lo), float(hi), int(draws.size))
