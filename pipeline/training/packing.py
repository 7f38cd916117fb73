"""Padding-free, prefix-shared policy forward over preference pairs (docs/method.md §Packed forward).

A pair (prompt x, chosen y_w, rejected y_l) is laid out once as ``[x, y_w, y_l]`` inside a packed row; pairs
follow each other in the row. Position ids restart per branch (``y_w`` and ``y_l`` both start at ``len(x)``)
and a 4D mask lets a token see only earlier tokens of its own pair's prompt and of its own branch, so every
hidden state equals the one of the unshared sequence ``x + y`` run alone: the prompt is computed once per
pair and no position is padding (but the tail of a row when a batch needs more than one row).

Attention implementations that take no dense mask (FlashAttention varlen) get the packed layout without
sharing: ``[x, y_w][x, y_l]`` as separate sequences whose position ids reset, which Hugging Face models turn
into varlen attention; no padding, the prompt is run twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from pipeline.training.sequences import _chunk_logps, _token_logps

ROW_TOKENS = 2048  # tokens per packed row; more pairs start a new row (dense masks grow as row length²)
SHARED_ATTENTION = ("eager", "sdpa")  # implementations that take a custom 4D mask


class PairIds(Protocol):
    """What packing needs of a pair (``TokenizedPair`` has it)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass(frozen=True)
class PackedPairs:
    """Packed rows of B pairs and where each response token's log-prob is read.

    Shapes: ``input_ids``, ``position_ids``, ``segment``, ``branch``: ``[R, L]``; ``predict_index``,
    ``targets``, ``sequence_index``: ``[M]`` (one per response token). ``predict_index`` is the flat
    (``row * L + column``) position whose hidden state predicts the target; ``sequence_index`` is ``i`` for
    pair i's chosen response and ``B + i`` for its rejected one (chosen then rejected, like ``pairs_batch``).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment: torch.Tensor  # which pair (or, unshared, which sequence) of the row a position belongs to
    branch: torch.Tensor  # 0 prompt (seen by both responses), 1 chosen, 2 rejected
    predict_index: torch.Tensor
    targets: torch.Tensor
    sequence_index: torch.Tensor
    num_sequences: int
    num_tokens: int  # tokens of the 2B sequences prompt + response: what a padded batch holds unpadded
    forward_tokens: int  # non-padding positions actually run (the prompt once per pair when shared)
    attended_keys: int  # keys the non-padding positions attend to, summed (the attention FLOPs scale)
    shared_prefix: bool


def _validate(pairs: Sequence[PairIds]) -> None:
    if not pairs:
        raise ValueError("pack_pairs needs at least one pair")
    for index, pair in enumerate(pairs):
        if not pair.prompt_ids:
            raise ValueError(f"pair {index} has an empty prompt: its first response token has no context")


def pack_pairs(
    pairs: Sequence[PairIds], pad_id: int, shared_prefix: bool = True, row_tokens: int = ROW_TOKENS
) -> PackedPairs:
    """Lay ``pairs`` out in packed rows (see the module docstring); a pair never spans two rows.

    ``shared_prefix=False`` packs ``[x, y_w][x, y_l]`` into a single row (for varlen attention).
    """
    _validate(pairs)
    count = len(pairs)
    rows: list[list[int]] = [[]]
    positions: list[list[int]] = [[]]
    segments: list[list[int]] = [[]]
    branches: list[list[int]] = [[]]
    predict: list[tuple[int, int]] = []  # (row, column)
    targets: list[int] = []
    owners: list[int] = []
    next_segment = [0]  # per row

    def add(row: int, ids: list[int], pos: list[int], seg: int, branch: int) -> None:
        rows[row].extend(ids)
        positions[row].extend(pos)
        segments[row].extend([seg] * len(ids))
        branches[row].extend([branch] * len(ids))

    def read(row: int, last_context: int, start: int, response: list[int], owner: int) -> None:
        """Response token k is predicted by the position before it (the prompt's last one for k = 0)."""
        for k, token in enumerate(response):
            predict.append((row, last_context if k == 0 else start + k - 1))
            targets.append(token)
            owners.append(owner)

    for i, pair in enumerate(pairs):
        p, c, r = pair.prompt_ids, pair.chosen_ids, pair.rejected_ids
        size = len(p) + len(c) + len(r) if shared_prefix else 2 * len(p) + len(c) + len(r)
        if shared_prefix and rows[-1] and len(rows[-1]) + size > row_tokens:
            for column in (rows, positions, segments, branches):
                column.append([])
            next_segment.append(0)
        row, offset, n = len(rows) - 1, len(rows[-1]), len(p)
        seg = next_segment[row]
        next_segment[row] += 1 if shared_prefix else 2
        if shared_prefix:
            add(row, p, list(range(n)), seg, 0)
            add(row, c, list(range(n, n + len(c))), seg, 1)
            add(row, r, list(range(n, n + len(r))), seg, 2)
            read(row, offset + n - 1, offset + n, c, i)
            read(row, offset + n - 1, offset + n + len(c), r, count + i)
        else:
            second = offset + n + len(c)
            add(row, p + c, list(range(n + len(c))), seg, 1)
            add(row, p + r, list(range(n + len(r))), seg + 1, 2)
            read(row, offset + n - 1, offset + n, c, i)
            read(row, second + n - 1, second + n, r, count + i)
    width = max(len(row) for row in rows)
    forward_tokens = sum(len(row) for row in rows)
    pad = [width - len(row) for row in rows]
    ids = torch.tensor([row + [pad_id] * k for row, k in zip(rows, pad, strict=True)], dtype=torch.long)
    pos = torch.tensor(
        [row + list(range(k)) for row, k in zip(positions, pad, strict=True)], dtype=torch.long
    )
    # Padding is one more segment per row (causal among itself, so no query row of the mask is empty).
    seg_t = torch.tensor([row + [-1] * k for row, k in zip(segments, pad, strict=True)], dtype=torch.long)
    br_t = torch.tensor([row + [0] * k for row, k in zip(branches, pad, strict=True)], dtype=torch.int8)
    flat = torch.tensor([row * width + column for row, column in predict], dtype=torch.long)
    logical = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    attended = sum(
        _attended(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids), shared_prefix) for p in pairs
    )
    return PackedPairs(
        input_ids=ids,
        position_ids=pos,
        segment=seg_t,
        branch=br_t,
        predict_index=flat,
        targets=torch.tensor(targets, dtype=torch.long),
        sequence_index=torch.tensor(owners, dtype=torch.long),
        num_sequences=2 * count,
        num_tokens=logical,
        forward_tokens=forward_tokens,
        attended_keys=attended,
        shared_prefix=shared_prefix,
    )


def _row_widths(sizes: Sequence[int], row_tokens: int) -> list[int]:
    """Row lengths of :func:`pack_pairs`'s greedy, in-order packing of pairs of ``sizes`` tokens."""
    rows = [0]
    for size in sizes:
        if rows[-1] and rows[-1] + size > row_tokens:
            rows.append(0)
        rows[-1] += size
    return rows


def choose_row_tokens(pairs: Sequence[PairIds], key_cost: float, cap: int = ROW_TOKENS) -> int:
    """The row budget (≤ ``cap``, or the largest pair) of least estimated cost for the shared layout.

    A row of width W costs W positions (its padding runs too) plus ``key_cost``·W² for its dense attention
    mask (every query meets every key of the row); ``key_cost`` is the cost of one query-key pair relative
    to one position (``FlopModel.key_cost``). Few long rows waste attention, many short rows padding.
    """
    sizes = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    if not sizes:
        return cap
    best_budget, best_cost = max(sizes), float("inf")
    for count in range(1, len(sizes) + 1):  # budgets that fit about ``count`` of the largest pairs
        budget = max(max(sizes), min(cap, count * max(sizes)))
        widths = _row_widths(sizes, budget)
        width = max(widths)
        cost = len(widths) * (width + key_cost * width * width)
        if cost < best_cost:
            best_budget, best_cost = budget, cost
    return best_budget


def _attended(prompt: int, chosen: int, rejected: int, shared: bool) -> int:
    """Keys seen by a pair's positions: token k of a causal sequence sees k + 1; responses also the prompt."""

    def causal(n: int) -> int:
        return n * (n + 1) // 2

    if not shared:
        return causal(prompt + chosen) + causal(prompt + rejected)
    return causal(prompt) + prompt * (chosen + rejected) + causal(chosen) + causal(rejected)


def packed_mask(packed: PackedPairs) -> torch.Tensor:
    """Boolean ``[R, 1, L, L]``: query i sees key j iff same segment, j ≤ i, and j is prompt or i's branch."""
    seg, branch = packed.segment, packed.branch
    length = seg.shape[1]
    same = seg[:, :, None] == seg[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    visible = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    return (same & causal & visible).unsqueeze(1)


def attention_implementation(model: Any) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def shares_prefix(model: Any) -> bool:
    """Whether ``model``'s attention takes the dense prefix-sharing mask (else: packed without sharing)."""
    return attention_implementation(model) in SHARED_ATTENTION


def _model_mask(model: Any, packed: PackedPairs, device: torch.device) -> torch.Tensor | None:
    if not packed.shared_prefix:
        return None  # the model builds varlen / block-diagonal attention from the position ids
    mask = packed_mask(packed).to(device)
    if attention_implementation(model) == "sdpa":
        return mask
    dtype = next(model.parameters()).dtype  # eager adds the mask to the attention scores
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(mask, zero, torch.finfo(dtype).min)


def packed_logps(model: Any, packed: PackedPairs, full_forward: bool = False) -> torch.Tensor:
    """Summed response log-probs ``[2B]`` (chosen of each pair, then rejected) from one packed forward.

    Equal (up to float rounding) to ``sequence_logps`` of the padded ``pairs_batch`` of the same pairs.
    The LM head runs only on the positions that predict a response token, in checkpointed chunks;
    ``full_forward`` goes through the root module (FSDP) and reads those positions from its logits.
    """
    if packed.shared_prefix and not shares_prefix(model):
        raise ValueError(
            f"attention implementation {attention_implementation(model)!r} takes no custom mask: "
            f"pack with shared_prefix=False"
        )
    device = next(model.parameters()).device
    input_ids = packed.input_ids.to(device)
    inputs = {
        "input_ids": input_ids,
        "position_ids": packed.position_ids.to(device),
        "attention_mask": _model_mask(model, packed, device),
        "use_cache": False,
    }
    index = packed.predict_index.to(device)
    targets = packed.targets.to(device)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") and not full_forward else None
    head = model.get_output_embeddings()
    if decoder is not None and head is not None:
        hidden = decoder(**inputs).last_hidden_state
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
        token_logps = _token_logps(head, picked, targets)
    else:
        logits = model(**inputs).logits
        picked = logits.reshape(-1, logits.shape[-1]).index_select(0, index)
        token_logps = _chunk_logps(torch.nn.Identity(), picked, targets)
    owners = packed.sequence_index.to(device)
    return torch.zeros(packed.num_sequences, device=device, dtype=token_logps.dtype).index_add(
        0, owners, token_logps
    )
