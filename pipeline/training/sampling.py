"""Batch sampling of preference pairs with a state that checkpoints can save and restore exactly."""

from __future__ import annotations

import random
from typing import Any, Literal


class PairSampler:
    """Endless batches of indices into a dataset of ``size`` pairs.

    ``cycle`` walks reshuffled epochs (every pair once per epoch); ``replacement`` draws uniformly. D_t and
    D_e get one sampler each, so datasets of different sizes are drawn independently.
    """

    def __init__(self, size: int, batch_size: int, mode: Literal["cycle", "replacement"], seed: int) -> None:
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.size = size
        self.batch_size = batch_size
        self.mode = mode
        self._rng = random.Random(seed)
        self._order: list[int] = []
        self.epoch = 0

    def next_batch(self) -> list[int]:
        if self.mode == "replacement":
            return [self._rng.randrange(self.size) for _ in range(self.batch_size)]
        batch = []
        for _ in range(self.batch_size):
            if not self._order:
                self._order = list(range(self.size))
                self._rng.shuffle(self._order)
                self.epoch += 1
            batch.append(self._order.pop())
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng.getstate(), "order": list(self._order), "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rng_state = state["rng"]
        # JSON/pickle round trips may turn the inner tuple into a list.
        self._rng.setstate((rng_state[0], tuple(rng_state[1]), rng_state[2]))
        self._order = list(state["order"])
        self.epoch = int(state["epoch"])


def pairs_per_mode(alpha: float | str, batch_size: int, budget: str) -> tuple[int, int]:
    """Pairs drawn per micro-batch from D_t and D_e (``docs/method.md`` §Matched budgets).

    ``matched``: every α sees ``2·batch_size`` pairs per micro-batch, so baselines and BVPO get the same data
    (and, up to length noise, tokens) per step: α = 1 draws them all from D_t, α = 0 all from D_e, any other
    α (and ``auto``, whose α moves during training) ``batch_size`` from each. ``per_mode``: ``batch_size``
    from every mode with a non-zero weight (BVPO then sees twice the pairs of a baseline).

    Args:
        alpha: the configured α: a number in [0, 1], or ``"auto"``.
        batch_size: ``train.batch_size``.
        budget: ``"matched"`` or ``"per_mode"``.
    """
    if budget not in ("matched", "per_mode"):
        raise ValueError(f"budget must be 'matched' or 'per_mode', got {budget!r}")
    if alpha == "auto":
        return batch_size, batch_size
    value = float(alpha)
    scale = 2 if budget == "matched" else 1
    if value >= 1.0:
        return scale * batch_size, 0
    if value <= 0.0:
        return 0, scale * batch_size
    return batch_size, batch_size
