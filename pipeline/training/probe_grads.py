"""Per-sequence log-probs and (projected) gradients for the gradient probe (docs/method.md §Probe estimator).

``head`` (default without LoRA) is the LM-head weight ``W``; its per-sequence gradient has the closed form
``Σ_t (e_{y_t} − p_t) h_tᵀ``, so the probe needs only forward passes, and no prompt or block runs twice: each
distinct prompt runs once (a KV cache serves its M traces and the reasoning-off block), each trace block once
with its answers packed after it under a 4D mask (:func:`_packed_prefix_states`), and the block's share of the
log-prob and of the gradient is added to each answer's. Its logits follow the training's resolved autocast
(``train.bf16: auto``: bf16 only where it is native). ``lora`` (default with LoRA) and ``all`` take
per-sequence autograd gradients of the LoRA adapters / every trainable weight. When the
subset has more than ``projection_dim`` = D weights the gradients pass through a seeded random projection S
with ``E[SᵀS] = I``, which preserves inner products and squared norms in expectation: for the head a Kronecker
Gaussian sketch ``P_V G P_Hᵀ`` (``P_V``: (D/d_h) × V, ``P_H``: d_h × H, d_h = min(H, 64), entries
N(0, 1/rows)), computed from ``(P_V (e_y − p)) (P_H h)ᵀ`` without forming the V × H gradient; for other
subsets a count sketch. With a tied LM head ``head`` is the output-projection part of that gradient.

The reference pass (:class:`HeadGradients` without gradients, given a :class:`Sampler`) also gives the
log-probs of each sequence's sampled tokens under the processed sampler distribution q (temperature, top-p):
``log q(y | x, r)`` of the answer and ``log q(r | x)`` of the block's sampled tokens.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ProbeConfig
from pipeline.training.modeling import autocast
from pipeline.training.packing import attention_implementation, shares_prefix
from pipeline.training.precision import resolve_bf16
from pipeline.training.probe_estimator import processed_log_softmax
from pipeline.training.probe_set import ProbeDataError
from pipeline.training.sequences import HEAD_CHUNK, collate

HEAD_SKETCH_COLS = 64  # d_h: columns of the head's Kronecker sketch (capped by the hidden size)

Triple = tuple[list[int], list[int], list[int]]  # (prompt, block, answer)


@dataclass(frozen=True)
class Sampler:
    """The processed distribution q that drew the stored sequences, and which tokens it drew.

    ``masks``: per sequence, ``(block mask, answer mask)``: True where the token was sampled (prefilled and
    forced tokens have q = 1).
    """

    temperature: float
    top_p: float
    masks: list[tuple[list[bool], list[bool]]]


@dataclass(frozen=True)
class SequenceStats:
    """Per sequence: ``log π(block, answer | prompt)``, ``log π(answer | prompt, block)`` and the (projected)
    gradient of the first, ``[S]``, ``[S]``, ``[S, D]`` (None when not asked for); with a :class:`Sampler`,
    ``log q(answer | prompt, block)`` and ``log q(block | prompt)`` over sampled tokens, ``[S]`` each, and
    the answer's log-prob at the sampler's temperature without top-p."""

    total: torch.Tensor
    answer: torch.Tensor
    grads: torch.Tensor | None
    answer_q: torch.Tensor | None = None
    block_q: torch.Tensor | None = None
    answer_tempered: torch.Tensor | None = None  # log q of the answer at the temperature, without top-p


def _response_hidden(
    model: nn.Module, seqs: Sequence[tuple[list[int], list[int], list[int]]], pad_id: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """Decoder states at the positions predicting each response token, the targets, and answer lengths."""
    batch = collate([(p, b + a) for p, b, a in seqs], pad_id)
    device = next(model.parameters()).device
    ids, attention = batch.input_ids.to(device), batch.attention_mask.to(device)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=attention).last_hidden_state  # type: ignore[operator]
    predict = batch.response_mask[:, 1:].to(device)
    states = [hidden[i, :-1][predict[i]] for i in range(len(seqs))]
    targets = [ids[i, 1:][predict[i]] for i in range(len(seqs))]
    return states, targets, [len(a) for _, _, a in seqs]


def _head_dtype(head: nn.Module) -> torch.dtype:
    """Softmax and gradient sketches run in float32 (float64 for a float64 model); the logits' matmul follows
    the training's autocast (bf16 when ``train.bf16``)."""
    return torch.float64 if head.weight.dtype == torch.float64 else torch.float32


class _HeadGradients:
    """Closed-form ∇_W log π(response) of the LM-head weight ``W`` [V, H], exact or Kronecker-sketched."""

    name = "head"

    def __init__(self, model: nn.Module, dim: int | None, seed: int = 0) -> None:
        """``dim=None``: log-probs only (no gradients are asked for)."""
        head = model.get_output_embeddings()  # type: ignore[operator]
        if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
            raise ProbeDataError("probe params 'head': the model has no linear output embedding")
        vocab, hidden = head.weight.shape
        self.p_v: torch.Tensor | None = None
        self.p_h: torch.Tensor | None = None
        if dim is None:
            self.dim = 0
        elif vocab * hidden <= dim:
            self.dim = vocab * hidden
        else:
            cols = min(hidden, HEAD_SKETCH_COLS)
            rows = max(1, dim // cols)
            gen = torch.Generator().manual_seed(seed)
            device = head.weight.device
            self.p_v = (torch.randn(rows, vocab, generator=gen) / math.sqrt(rows)).to(device)
            self.p_h = (torch.randn(cols, hidden, generator=gen) / math.sqrt(cols)).to(device)
            self.dim = rows * cols

    def _segments(
        self,
        states: torch.Tensor,
        targets: torch.Tensor,
        segment: torch.Tensor,
        count: int,
        head: nn.Module,
        bf16: bool,
        with_grads: bool,
        sampled: torch.Tensor | None = None,
        sampler: Sampler | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Summed log-probs ``[S]`` of the targets of each segment, the (sketched) gradients ``[S, D]``, and
        with a ``sampler`` the summed processed log-probs ``log q`` of the sampled targets ``[S]`` and the
        same at the temperature without top-p.

        ``states`` ``[T, H]`` predict ``targets`` ``[T]``; ``segment`` ``[T]`` says which of the ``count``
        segments each position belongs to; ``sampled`` ``[T]``: 0 not sampled (q = 1), 1 a sampled answer
        token (−inf outside the top-p nucleus), 2 a sampled trace token (it was drawn, so outside the
        recomputed nucleus, a numerical edge, it counts its tempered log-prob). The head runs in chunks of
        positions, its weight cast once (bf16 as in training when ``bf16``); softmax and sketches run in
        float32 (float64 for a float64 model).
        """
        dtype = _head_dtype(head)
        low = bf16 and dtype != torch.float64
        head_weight: torch.Tensor = head.weight  # type: ignore[assignment]
        weight = head_weight.detach().to(torch.bfloat16 if low else dtype)
        bias = getattr(head, "bias", None)
        bias = None if bias is None else bias.detach().to(weight.dtype)
        p_v = None if self.p_v is None else self.p_v.to(dtype)
        p_h = None if self.p_h is None else self.p_h.to(dtype)
        device = weight.device
        logps = torch.zeros(count, dtype=dtype, device=device)
        logqs = torch.zeros(count, dtype=dtype, device=device) if sampler is not None else None
        tempered_sums = torch.zeros(count, dtype=dtype, device=device) if sampler is not None else None
        grads = torch.zeros(count, self.dim, dtype=dtype, device=device) if with_grads else None
        left: list[torch.Tensor] = []
        right: list[torch.Tensor] = []
        for start in range(0, states.shape[0], HEAD_CHUNK):
            h = states[start : start + HEAD_CHUNK].to(dtype)
            y = targets[start : start + HEAD_CHUNK]
            seg = segment[start : start + HEAD_CHUNK]
            logits = F.linear(h.to(weight.dtype), weight, bias).to(dtype)
            logp = logits.log_softmax(-1)
            logps.index_add_(0, seg, logp.gather(1, y.unsqueeze(1)).squeeze(1))
            if logqs is not None and sampler is not None and sampled is not None:
                kind = sampled[start : start + HEAD_CHUNK]
                q = processed_log_softmax(logits, sampler.temperature, sampler.top_p)
                lq = q.gather(1, y.unsqueeze(1)).squeeze(1)
                lt = (
                    processed_log_softmax(logits, sampler.temperature, 1.0)
                    .gather(1, y.unsqueeze(1))
                    .squeeze(1)
                )
                lq = torch.where(torch.isinf(lq) & (kind == 2), lt, lq)
                zero = torch.zeros_like(lq)
                logqs.index_add_(0, seg, torch.where(kind > 0, lq, zero))
                if tempered_sums is not None:
                    tempered_sums.index_add_(0, seg, torch.where(kind > 0, lt, zero))
            if grads is None:
                continue
            probs = logp.exp_()  # logp is not read again
            if p_v is None or p_h is None:  # exact: Σ_t (e_y − p_t) h_tᵀ per segment
                probs[torch.arange(len(y), device=device), y] -= 1.0
                for s in seg.unique():
                    rows = seg == s
                    grads[s] -= (probs[rows].T @ h[rows]).flatten()
            else:
                left.append(p_v[:, y].T - probs @ p_v.T)  # [t, rows] = P_V (e_y − p_t)
                right.append(h @ p_h.T)  # [t, cols] = P_H h_t
        if grads is not None and left:
            u, z = torch.cat(left), torch.cat(right)
            for s in segment.unique():
                rows = segment == s
                grads[s] = (u[rows].T @ z[rows]).flatten()  # Σ_t (P_V(e_y − p_t)) (P_H h_t)ᵀ
        return logps, grads, logqs, tempered_sums

    def stats(
        self,
        model: nn.Module,
        seqs: Sequence[tuple[list[int], list[int], list[int]]],
        pad_id: int,
        bf16: bool | str,
        *,
        with_grads: bool,
        sampler: Sampler | None = None,
    ) -> SequenceStats:
        """Log-probs (and gradients; with a ``sampler``, processed log-probs) of ``(prompt, block, answer)``
        sequences; each distinct prompt + block prefix runs through the decoder once and its KV cache serves
        all of its answers."""
        if with_grads and self.dim == 0:
            raise ValueError("this head-gradient backend computes log-probs only")
        bf16 = resolve_bf16(bf16)  # train.bf16: auto → bf16 only where it is native, as the training
        head = model.get_output_embeddings()  # type: ignore[operator]
        with torch.no_grad():
            groups = _prefix_groups(seqs)
            with autocast(bf16):
                if shares_prefix(model):
                    states = _packed_prefix_states(model, groups, pad_id)
                else:
                    states = _shared_prefix_states(model, groups, pad_id)
            # Segments: each group's block, then each of its answers.
            parts_h: list[torch.Tensor] = []
            parts_y: list[list[int]] = []
            parts_kind: list[list[int]] = []
            masks = sampler.masks if sampler is not None else None
            block_of: list[int] = []
            answer_of: dict[int, int] = {}
            for (_, block, members), (block_h, answer_hs) in zip(groups, states, strict=True):
                block_of.append(len(parts_h))
                parts_h.append(block_h)
                parts_y.append(block)
                first = members[0][0]
                parts_kind.append([2 * m for m in masks[first][0]] if masks else [0] * len(block))
                for (index, answer), answer_h in zip(members, answer_hs, strict=True):
                    answer_of[index] = len(parts_h)
                    parts_h.append(answer_h)
                    parts_y.append(answer)
                    parts_kind.append([int(m) for m in masks[index][1]] if masks else [0] * len(answer))
            device = parts_h[0].device
            segment = torch.cat(
                [torch.full((len(y),), i, dtype=torch.long, device=device) for i, y in enumerate(parts_y)]
            )
            targets = torch.tensor([t for y in parts_y for t in y], dtype=torch.long, device=device)
            sampled = torch.tensor(
                [k for kinds in parts_kind for k in kinds], dtype=torch.long, device=device
            )
            logps, grads, logqs, tempered = self._segments(
                torch.cat(parts_h), targets, segment, len(parts_h), head, bf16, with_grads, sampled, sampler
            )
            block_index = [block_of[g] for g, (_, _, members) in enumerate(groups) for _ in members]
            order = [index for _, _, members in groups for index, _ in members]
            blocks = torch.empty(len(seqs), dtype=torch.long)
            answers = torch.empty(len(seqs), dtype=torch.long)
            blocks[order] = torch.tensor(block_index)
            answers[order] = torch.tensor([answer_of[i] for i in order])
            blocks, answers = blocks.to(device), answers.to(device)
            total = logps[blocks] + logps[answers]
            grad = None if grads is None else grads[blocks] + grads[answers]
        return SequenceStats(
            total.double().cpu(),
            logps[answers].double().cpu(),
            None if grad is None else grad.double().cpu(),
            None if logqs is None else logqs[answers].double().cpu(),
            None if logqs is None else logqs[blocks].double().cpu(),
            None if tempered is None else tempered[answers].double().cpu(),
        )


def _prefix_groups(
    seqs: Sequence[tuple[list[int], list[int], list[int]]],
) -> list[tuple[list[int], list[int], list[tuple[int, list[int]]]]]:
    """``(prompt, block, [(sequence index, answer), ...])`` for each distinct prompt + block, in order."""
    groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[tuple[int, list[int]]]] = {}
    for index, (prompt, block, answer) in enumerate(seqs):
        if not prompt or not answer:
            raise ProbeDataError("probe sequences need a non-empty prompt and answer")
        groups.setdefault((tuple(prompt), tuple(block)), []).append((index, answer))
    return [(list(p), list(b), members) for (p, b), members in groups.items()]


def _shared_prefix_states(
    model: nn.Module, groups: list[tuple[list[int], list[int], list[tuple[int, list[int]]]]], pad_id: int
) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Decoder states predicting each block token and each answer token, per :func:`_prefix_groups` group.

    Prefixes (prompt + block) run once, right-padded, and fill a KV cache; every answer continues from its
    prefix's cache (rows selected per answer) after the masked pad columns, with position ids that continue
    the prefix, so shared prefixes are not recomputed. (Right padding keeps every query row attending to at
    least one real token: a fully masked row would put NaN keys into the cache.) The state at a prefix's last
    position predicts the first token of each of its answers.
    """
    device = next(model.parameters()).device
    decoder = model.get_decoder()  # type: ignore[operator]
    prefixes = [prompt + block for prompt, block, _ in groups]
    lengths = torch.tensor([len(p) for p in prefixes], device=device)
    width = max(len(p) for p in prefixes)
    ids = torch.full((len(prefixes), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prefixes), width), dtype=torch.long)
    for row, prefix in enumerate(prefixes):
        ids[row, : len(prefix)] = torch.tensor(prefix)
        mask[row, : len(prefix)] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = torch.arange(width, device=device).unsqueeze(0).expand(len(prefixes), -1)
    out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    hidden, cache = out.last_hidden_state, out.past_key_values
    rows = [g for g, (_, _, members) in enumerate(groups) for _ in members]
    answers = [answer for _, _, members in groups for _, answer in members]
    a_width = max(len(a) for a in answers)
    a_ids = torch.full((len(answers), a_width), pad_id, dtype=torch.long)
    a_mask = torch.zeros((len(answers), a_width), dtype=torch.long)
    for row, answer in enumerate(answers):
        a_ids[row, : len(answer)] = torch.tensor(answer)
        a_mask[row, : len(answer)] = 1
    select = torch.tensor(rows, device=device)
    cache.batch_select_indices(select)
    a_positions = lengths[select].unsqueeze(1) + torch.arange(a_width, device=device).unsqueeze(0)
    continued = decoder(
        input_ids=a_ids.to(device),
        attention_mask=torch.cat([mask[select], a_mask.to(device)], dim=1),
        position_ids=a_positions,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state
    out_states: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
    answer_row = 0
    for g, (prompt, block, members) in enumerate(groups):
        end = len(prompt) + len(block)
        last = hidden[g, end - 1 : end]  # predicts the first answer token
        block_states = hidden[g, len(prompt) - 1 : end - 1]  # predict the block's tokens
        answer_states = []
        for _, answer in members:
            answer_states.append(torch.cat([last, continued[answer_row, : len(answer) - 1]]))
            answer_row += 1
        out_states.append((block_states, answer_states))
    return out_states


BUCKET_FILL = 0.75  # a unit row joins a bucket while its width is at least this share of the bucket's widest


def _unit_buckets(widths: Sequence[int]) -> list[list[int]]:
    """Indices of unit rows grouped into batches of similar width, widest first (bounded padding)."""
    order = sorted(range(len(widths)), key=lambda i: -widths[i])
    buckets: list[list[int]] = []
    for i in order:
        if buckets and widths[i] >= BUCKET_FILL * widths[buckets[-1][0]]:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


def _packed_prefix_states(
    model: nn.Module, groups: list[tuple[list[int], list[int], list[tuple[int, list[int]]]]], pad_id: int
) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """What :func:`_shared_prefix_states` returns, with every needed position run exactly once.

    Each distinct prompt runs once (right-padded batch, KV cache). Each group is then one packed unit row
    ``[block, answer_1[:-1], answer_2[:-1], ...]`` that continues from its prompt's cache: a 4D mask lets a
    block token see its prompt and the earlier block tokens, an answer token its prompt, the whole block and
    its own earlier tokens, and position ids continue the prompt (as in docs/method.md §Packed forward), so
    every state equals that of ``prompt + block + answer`` run alone. So neither the prompt (shared by the M
    traces and by the reasoning-off block when its prompt is the same) nor the block is run more than once,
    and an answer's last token, which predicts nothing, is not run. Unit rows of similar width are batched
    (:func:`_unit_buckets`), each batch from a copy of the prompts' cache.
    """
    device = next(model.parameters()).device
    decoder = model.get_decoder()  # type: ignore[operator]
    prompt_index: dict[tuple[int, ...], int] = {}
    for prompt, _, _ in groups:
        prompt_index.setdefault(tuple(prompt), len(prompt_index))
    prompts = [list(p) for p in prompt_index]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt)
        mask[row, : len(prompt)] = True
    ids, mask = ids.to(device), mask.to(device)
    positions = torch.arange(width, device=device).unsqueeze(0).expand(len(prompts), -1)
    out = decoder(input_ids=ids, attention_mask=mask.long(), position_ids=positions, use_cache=True)
    prompt_hidden, prompt_cache = out.last_hidden_state, out.past_key_values

    # Unit rows: tokens, position ids, and which part (0 block, k ≥ 1 answer k) each column is.
    units: list[tuple[list[int], list[int], list[int]]] = []
    for prompt, block, members in groups:
        tokens, pos, part = list(block), list(range(len(prompt), len(prompt) + len(block))), [0] * len(block)
        start = len(prompt) + len(block)
        for k, (_, answer) in enumerate(members, start=1):
            tokens += answer[:-1]
            pos += list(range(start, start + len(answer) - 1))
            part += [k] * (len(answer) - 1)
        units.append((tokens, pos, part))
    hidden_of: list[torch.Tensor | None] = [None] * len(groups)
    buckets = _unit_buckets([max(1, len(u[0])) for u in units])
    for n, bucket in enumerate(buckets):
        u_width = max(1, max(len(units[g][0]) for g in bucket))
        u_ids = torch.full((len(bucket), u_width), pad_id, dtype=torch.long)
        u_pos = torch.zeros((len(bucket), u_width), dtype=torch.long)
        # Per column: its part, −1 for padding; a query sees keys of its own part, or of the block (part 0).
        u_part = torch.full((len(bucket), u_width), -1, dtype=torch.long)
        for row, g in enumerate(bucket):
            tokens, pos, part = units[g]
            u_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            u_pos[row, : len(tokens)] = torch.tensor(pos, dtype=torch.long)
            u_part[row, : len(tokens)] = torch.tensor(part, dtype=torch.long)
        causal = torch.ones(u_width, u_width, dtype=torch.bool).tril()
        real = u_part >= 0
        visible = (u_part[:, None, :] == 0) | (u_part[:, :, None] == u_part[:, None, :])
        own = causal & visible & real[:, None, :] & real[:, :, None]
        select = torch.tensor([prompt_index[tuple(groups[g][0])] for g in bucket], device=device)
        # Padding queries see their prompt only (no query row of the mask is empty: no NaN states).
        seen = mask[select].unsqueeze(1).expand(-1, u_width, -1)
        full = torch.cat([seen, own.to(device)], dim=2).unsqueeze(1)
        cache = prompt_cache if n == len(buckets) - 1 else copy.deepcopy(prompt_cache)
        cache.batch_select_indices(select)
        hidden = decoder(
            input_ids=u_ids.to(device),
            attention_mask=_dense_mask(model, full),
            position_ids=u_pos.to(device),
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        for row, g in enumerate(bucket):
            hidden_of[g] = hidden[row]
    out_states: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
    for g, (prompt, block, members) in enumerate(groups):
        unit_h = hidden_of[g]
        assert unit_h is not None
        prompt_last = prompt_hidden[prompt_index[tuple(prompt)], len(prompt) - 1 : len(prompt)]
        block_states = torch.cat([prompt_last, unit_h[: len(block)]])  # predict block tokens, then answer 0
        answer_states = []
        offset = len(block)
        for _, answer in members:
            answer_states.append(torch.cat([block_states[-1:], unit_h[offset : offset + len(answer) - 1]]))
            offset += len(answer) - 1
        out_states.append((block_states[:-1], answer_states))
    return out_states


def _dense_mask(model: nn.Module, visible: torch.Tensor) -> torch.Tensor:
    """A boolean 4D mask as the attention implementation takes it (sdpa: boolean; eager: additive)."""
    if attention_implementation(model) == "sdpa":
        return visible
    dtype = next(model.parameters()).dtype
    zero = torch.zeros((), dtype=dtype, device=visible.device)
    return torch.where(visible, zero, torch.finfo(dtype).min)


class _ParamGradients:
    """Autograd gradients of a parameter subset, one sequence at a time, exact or count-sketched to D."""

    def __init__(self, name: str, params: list[nn.Parameter], dim: int, seed: int) -> None:
        if not params:
            raise ProbeDataError(f"probe params '{name}': the model has no such trainable weights")
        self.name = name
        self.params = params
        total = sum(p.numel() for p in params)
        self.buckets: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if total <= dim:
            self.dim = total
            return
        self.dim = dim
        gen = torch.Generator().manual_seed(seed)
        self.buckets = []
        for p in params:
            index = torch.randint(0, dim, (p.numel(),), generator=gen).to(p.device)
            sign = (torch.randint(0, 2, (p.numel(),), generator=gen, dtype=torch.int8) * 2 - 1).to(p.device)
            self.buckets.append((index, sign))

    def _project(self, grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        flat = [
            torch.zeros(p.numel(), device=p.device) if g is None else g.detach().flatten().double()
            for p, g in zip(self.params, grads, strict=True)
        ]
        if self.buckets is None:
            return torch.cat([f.double() for f in flat]).cpu()
        out = torch.zeros(self.dim, dtype=torch.float64, device=flat[0].device)
        for f, (index, sign) in zip(flat, self.buckets, strict=True):
            out.index_add_(0, index, f.double() * sign)
        return out.cpu()

    def stats(
        self,
        model: nn.Module,
        seqs: Sequence[tuple[list[int], list[int], list[int]]],
        pad_id: int,
        bf16: bool | str,
        *,
        with_grads: bool,
    ) -> SequenceStats:
        bf16 = resolve_bf16(bf16)
        head = model.get_output_embeddings()  # type: ignore[operator]
        dtype = _head_dtype(head)
        bias = getattr(head, "bias", None)
        totals, answers, grads = [], [], []
        groups = [[s] for s in seqs] if with_grads else [list(seqs)]
        for group in groups:
            with torch.set_grad_enabled(with_grads):
                with autocast(bf16):
                    states, targets, answer_lengths = _response_hidden(model, group, pad_id)
                for h, y, n_answer in zip(states, targets, answer_lengths, strict=True):
                    # The head as in _HeadGradients (so the reference pass gives the same log-probs).
                    with autocast(bf16 and dtype != torch.float64):
                        logits = F.linear(
                            h.to(dtype), head.weight.to(dtype), None if bias is None else bias.to(dtype)
                        )
                    lp = logits.to(dtype).log_softmax(-1).gather(1, y.unsqueeze(1)).squeeze(1)
                    total = lp.sum()
                    totals.append(total.detach())
                    answers.append(lp[lp.shape[0] - n_answer :].sum().detach())
                    if with_grads:
                        grad = torch.autograd.grad(total, self.params, allow_unused=True)
                        grads.append(self._project(grad))
        return SequenceStats(
            torch.stack(totals).double().cpu(),
            torch.stack(answers).double().cpu(),
            torch.stack(grads) if with_grads else None,
        )


def resolve_params(model: nn.Module, settings: ProbeConfig) -> str:
    """The probed subset: ``settings.params``; ``auto`` → ``lora`` when LoRA adapters train, else ``head``."""
    if settings.params != "auto":
        return settings.params
    lora = any("lora_" in n and p.requires_grad for n, p in model.named_parameters())
    return "lora" if lora else "head"


def _backend(model: nn.Module, settings: ProbeConfig) -> _HeadGradients | _ParamGradients:
    name = resolve_params(model, settings)
    if name == "head":
        return _HeadGradients(model, settings.projection_dim, settings.seed)
    params = [p for n, p in model.named_parameters() if p.requires_grad and (name == "all" or "lora_" in n)]
    return _ParamGradients(name, params, settings.projection_dim, settings.seed)
