"""Paired comparisons of two models on the same prompts (``docs/method.md`` §Statistics).

Per prompt, a model's score is its mean over samples and seeds (pooled over seeds); the difference of two
models is taken prompt by prompt, and the bootstrap resamples prompts, so the interval covers the
prompt-to-prompt variation of the *difference* (narrower than the two separate intervals whenever the
models' scores are correlated across prompts). The minimum detectable difference (MDE) says which
differences an eval set of this size could have found at all: a "no significant difference" smaller than
the MDE is uninformative.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

LEVEL = 0.95  # two-sided confidence level of every interval and of the MDE
POWER = 0.80  # power of the MDE


@dataclass(frozen=True)
class PairedDiff:
    """Mean of ``arm − other`` over shared prompts, its percentile-bootstrap interval, SD and MDE."""

    mean: float
    ci_low: float
    ci_high: float
    n: int  # prompts in both
    sd: float  # SD of the per-prompt differences (ddof = 1; 0 for a single prompt)
    mde: float  # minimum detectable difference of this eval set at LEVEL / POWER (see paired_bootstrap)

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0."""
        return self.ci_low > 0 or self.ci_high < 0


def per_prompt_scores(rows: Iterable[Mapping[str, Any]], key: str = "score") -> dict[str, float]:
    """Mean of ``key`` per ``prompt_id`` over every row given (samples and seeds pooled)."""
    values: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        values[str(row["prompt_id"])].append(float(row[key]))
    return {pid: float(np.mean(v)) for pid, v in values.items()}


def z_sum(level: float = LEVEL, power: float = POWER) -> float:
    """``z_{1−(1−level)/2} + z_{power}`` (2.8016 for 95% and 80%)."""
    normal = NormalDist()
    return normal.inv_cdf(1 - (1 - level) / 2) + normal.inv_cdf(power)


def minimum_detectable_difference(sd: float, n: int, level: float = LEVEL, power: float = POWER) -> float:
    """Smallest true mean difference a two-sided paired test at ``level`` detects with ``power``.

    Normal approximation: ``(z_{1−a/2} + z_power) · sd / √n`` with ``sd`` the SD of the per-prompt
    differences and ``n`` the prompts; ``inf`` without prompts.
    """
    if n <= 0:
        return math.inf
    return z_sum(level, power) * sd / math.sqrt(n)


def prompts_needed(mde: float, sd: float, level: float = LEVEL, power: float = POWER) -> int:
    """Prompts an eval set needs so that its MDE is at most ``mde`` given the differences' ``sd``."""
    if mde <= 0:
        raise ValueError(f"the target difference must be positive, got {mde}")
    return max(2, math.ceil((z_sum(level, power) * sd / mde) ** 2))


def paired_bootstrap(
    arm: Mapping[str, float],
    other: Mapping[str, float],
    *,
    samples: int = 2000,
    seed: int = 0,
    level: float = LEVEL,
) -> PairedDiff:
    """``arm − other`` over the prompts both hold, with a percentile bootstrap over prompts.

    Args:
        arm, other: per-prompt scores (:func:`per_prompt_scores`).
        samples: bootstrap resamples.
        seed: seed of the resampling.
        level: two-sided confidence level.

    The MDE uses the SD of the per-prompt differences; when no prompt differed at all (SD 0: e.g. a
    checkpoint that still answers exactly like the reference) it uses the SD of a difference of two
    uncorrelated scores, ``√(Var a + Var b)``, instead of claiming that any difference would be seen.

    Raises:
        ValueError: the two share no prompt.
    """
    shared = sorted(set(arm) & set(other))
    if not shared:
        raise ValueError("the two models share no evaluated prompt")
    diffs = np.array([arm[p] - other[p] for p in shared], dtype=float)
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, diffs.size, size=(samples, diffs.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    sd = float(diffs.std(ddof=1)) if diffs.size > 1 else 0.0
    planning_sd = sd
    if sd == 0.0 and diffs.size > 1:  # no prompt differed: the paired SD says nothing about an alternative
        a = np.array([arm[p] for p in shared], dtype=float)
        b = np.array([other[p] for p in shared], dtype=float)
        planning_sd = float(np.sqrt(a.var(ddof=1) + b.var(ddof=1)))  # uncorrelated scores' difference
    return PairedDiff(
        mean=float(diffs.mean()),
        ci_low=float(np.percentile(means, tail)),
        ci_high=float(np.percentile(means, 100 - tail)),
        n=int(diffs.size),
        sd=sd,
        mde=minimum_detectable_difference(planning_sd, int(diffs.size), level),
    )


@dataclass(frozen=True)
class SeedSpread:
    """Mean score of each seed of an arm over the eval prompts, and their spread."""

    means: tuple[float, ...]
    sd: float  # across seeds (ddof = 1); 0 for one seed

    @property
    def range(self) -> float:
        return max(self.means) - min(self.means) if self.means else 0.0


def seed_spread(per_seed: Mapping[int, Mapping[str, float]]) -> SeedSpread:
    """Seed-to-seed spread of an arm from its per-prompt scores per seed."""
    means = tuple(float(np.mean(list(scores.values()))) for _, scores in sorted(per_seed.items()))
    sd = float(np.std(means, ddof=1)) if len(means) > 1 else 0.0
    return SeedSpread(means, sd)


def best_baseline(baselines: Mapping[str, Mapping[str, float]], candidates: Sequence[str]) -> str | None:
    """The candidate (e.g. α = 0 and α = 1) with the highest mean per-prompt score; ``None`` if none ran."""
    present = [c for c in candidates if baselines.get(c)]
    if not present:
        return None
    return max(present, key=lambda c: (float(np.mean(list(baselines[c].values()))), c))
