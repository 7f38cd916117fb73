"""Gradient-statistics probe: α̂* and the trace-induced variance, measured on the model being trained.

DESIGN.md §1 defines three estimators of the gradient of the preference loss on one preference
``(x, y⁺, y⁻)``:

- ``g_t``: the gradient of ℓ_t, each answer scored after its own sampled trace ``(r⁺, y⁺)``, ``(r⁻, y⁻)``;
- ``g_e``: the gradient of ℓ_e, each answer scored after the empty trace ``(∅, y±)``;
- ``G``: the gradient of the *marginal* loss
  ``−log σ(β[log π_θ(y⁺|x)/π_ref(y⁺|x) − log π_θ(y⁻|x)/π_ref(y⁻|x)])``.

Every ``every`` optimizer steps the probe takes a fixed probe set of D_t prompts and, for each, the
preference's answers ``y⁺, y⁻`` and ``M`` stored reasoning-on traces ``r_1..r_M`` of that prompt, and
computes per-example gradients of the response log-probs (answer teacher-forced after each trace):

- ``g_t^(k)`` (k = 1..M/2) uses the disjoint trace pair ``(r_{2k−1}, r_{2k})`` for chosen and rejected, so the
  K = M/2 samples are independent draws of the trace-based gradient;
- ``g_e`` scores the answers after the empty trace block of the prompt's reasoning-off generations;
- ``Ĝ^(−k)`` estimates G from the *other* M − 2 traces by self-normalized importance sampling:
  ``∇ log π_θ(y|x) ≈ Σ_j w_j ∇ log π_θ(r_j, y|x)``, ``w_j ∝ π_θ(r_j, y|x) / π_ref(r_j|x)``. The stored traces
  were sampled from the reference policy, so ``π_ref(r|x)`` is the proposal; at θ = π_ref (step 0) the weights
  are DESIGN.md's ``w_j ∝ π_θ(y|x, r_j)``. The marginal log-ratios in the sigmoid use the same samples
  (``π̂_θ(y|x) = mean_j π_θ(r_j, y|x)/π_ref(r_j|x)``, ``π̂_ref(y|x) = mean_j π_ref(y|x, r_j)``). Leaving the
  traces of sample k out keeps ``⟨Ĝ, g_t⟩`` free of a shared-trace covariance (which would bias α̂* upward
  by about ``tr Var[g_t] / (M · E‖g_t − g_e‖²)``).

From these, :func:`pipeline.training.alpha_star.estimate_gradient_stats` gives
``α̂* = clip(E⟨g_e − Ĝ, g_e − g_t⟩ / E‖g_t − g_e‖², 0, 1)`` with a bootstrap interval, ``tr Var_r[g_t]``, the
biases ``‖E g_t − Ĝ‖``, ``‖E g_e − Ĝ‖``; the probe adds ``tr Var_r[g_c]`` of ``g_c = α g_t + (1−α) g_e``
(``= α² tr Var_r[g_t]``, DESIGN.md §1) and ``MSE(α)`` against Ĝ at α = 1, 0 and the α in use.

**Why stored traces.** The generations dataset already holds ``generation.samples_per_prompt`` reasoning-on
samples per prompt, drawn by vLLM from the reference policy. The probe reuses them instead of starting a
generation engine inside the trainer (a vLLM engine would compete with training for the accelerator's memory
and cost tens of seconds to start). The price: the traces come from π_ref, not the current π_θ, which the
importance weights above correct for (exactly in expectation; the self-normalized estimate has O(1/M) bias).

**Which gradient.** ``params``: ``head`` (default without LoRA) is the LM-head weight ``W``; its per-sequence
gradient has the closed form ``Σ_t (e_{y_t} − p_t) h_tᵀ``, so the probe needs only forward passes, and each
prompt + trace prefix runs once (a KV cache serves both answers; the prefix's share of the log-prob and of the
gradient is added to each answer's). Its logits follow the training's autocast (bf16 when ``train.bf16``).
``lora`` (default with LoRA) and ``all`` take per-sequence autograd gradients of the LoRA adapters / every
trainable weight. When the subset has more than ``projection_dim`` = D weights (default 4096) the gradients
pass through a seeded random projection S with ``E[SᵀS] = I``, which preserves every inner product and squared
norm above in expectation: for the head a Kronecker Gaussian sketch ``P_V G P_Hᵀ`` (``P_V``: (D/d_h) × V,
``P_H``: d_h × H, d_h = min(H, 64), entries N(0, 1/rows)), computed from ``(P_V (e_y − p)) (P_H h)ᵀ`` without
forming the V × H gradient; for other subsets a count sketch (each weight added with a random sign to one of D
buckets). With a tied LM head (input and output embeddings shared) ``head`` is the output-projection part of
that gradient.

**Cost** (``bench/bench_probe.py``, SmolLM2-135M on 2 CPU cores, default TrainConfig and probe): one probe
takes about as long as 1.1 training steps, so probing every 10 steps adds about 10% wall time.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.config import ProbeConfig, TrainConfig
from pipeline.training.alpha_star import (
    AlphaController,
    GradientStats,
    estimate_gradient_stats,
    marginal_gradient,
    mixture_mse,
    trace_variance,
)
from pipeline.training.modeling import autocast
from pipeline.training.precision import resolve_bf16
from pipeline.training.sequences import collate

HEAD_CHUNK = 256  # token positions per LM-head chunk
HEAD_SKETCH_COLS = 64  # d_h: columns of the head's Kronecker sketch (capped by the hidden size)


class ProbeDataError(ValueError):
    """The data cannot form a probe set (too few stored traces, no reasoning-off generation, ...)."""


@dataclass(frozen=True)
class ProbeExample:
    """One probe prompt, tokenized: the D_t pair's answers and M stored trace blocks of the prompt."""

    prompt_id: str
    trace_prompt_ids: list[int]  # chat-rendered prompt of reasoning-on mode
    trace_blocks: list[list[int]]  # M trace blocks "<think>\n…\n</think>\n\n" of stored generations
    empty_prompt_ids: list[int]  # chat-rendered prompt of reasoning-off mode
    empty_block: list[int]  # the empty trace block (may be empty for native templates)
    chosen_ids: list[int]  # y⁺ (+ EOS)
    rejected_ids: list[int]  # y⁻ (+ EOS)

    def sequences(self) -> list[tuple[list[int], list[int], list[int]]]:
        """``(prompt, block, answer)`` triples: trace j with chosen (2j) and rejected (2j+1), then empty."""
        out = []
        for block in self.trace_blocks:
            out.append((self.trace_prompt_ids, block, self.chosen_ids))
            out.append((self.trace_prompt_ids, block, self.rejected_ids))
        out.append((self.empty_prompt_ids, self.empty_block, self.chosen_ids))
        out.append((self.empty_prompt_ids, self.empty_block, self.rejected_ids))
        return out


@dataclass(frozen=True)
class SequenceStats:
    """Per sequence: ``log π(block, answer | prompt)``, ``log π(answer | prompt, block)`` and the (projected)
    gradient of the first, ``[S]``, ``[S]``, ``[S, D]`` (None when not asked for)."""

    total: torch.Tensor
    answer: torch.Tensor
    grads: torch.Tensor | None


@dataclass(frozen=True)
class ProbeGradients:
    """The probe's samples: g_t ``[N, K, D]``, g_e ``[N, D]`` and the leave-out Ĝ ``[N, K, D]``."""

    g_t: torch.Tensor
    g_e: torch.Tensor
    g_hat: torch.Tensor


# -- building the probe set from stored rows ----------------------------------------------------------------


def _block_of(row: dict[str, Any]) -> str | None:
    """The trace block of a generation: ``response_text`` without its answer (None if it does not split)."""
    text, answer = row["response_text"], row["answer"] or ""
    if not text.endswith(answer):
        return None
    return text[: len(text) - len(answer)]


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_probe_examples(
    tokenizer: Any,
    pairs_trace: Sequence[dict[str, Any]],
    generations: Sequence[dict[str, Any]],
    settings: ProbeConfig,
    max_length: int,
) -> list[ProbeExample]:
    """Choose ``settings.prompts`` D_t prompts and tokenize their answers and stored traces.

    A prompt qualifies when it has a reasoning-off generation (for the empty block and its prompt) and at
    least ``settings.traces`` reasoning-on generations whose blocks fit ``max_length`` with either answer; the
    first ``settings.traces`` of them (by sample index) are used. Qualifying prompts are taken in a seeded
    order. Blocks and answers are tokenized separately, so the answer's tokens are exactly those scored after
    each trace.

    Raises:
        ProbeDataError: when no prompt qualifies.
    """
    by_prompt: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in generations:
        by_prompt[(row["prompt_id"], row["mode"])].append(row)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    candidates: list[ProbeExample] = []
    most = 0
    for pair in sorted(pairs_trace, key=lambda p: p["pair_id"]):
        pid = pair["prompt_id"]
        empties = sorted(by_prompt.get((pid, "empty"), []), key=lambda r: r["sample_index"])
        empty_block = next((b for b in map(_block_of, empties) if b is not None), None)
        if empty_block is None:
            continue
        prompt_ids = _ids(tokenizer, pair["prompt_text"])
        chosen = _ids(tokenizer, pair["chosen_answer"]) + eos
        rejected = _ids(tokenizer, pair["rejected_answer"]) + eos
        room = max_length - len(prompt_ids) - max(len(chosen), len(rejected))
        blocks = []
        for row in sorted(by_prompt.get((pid, "trace"), []), key=lambda r: r["sample_index"]):
            block = _block_of(row)
            if block is not None and len(ids := _ids(tokenizer, block)) <= room:
                blocks.append(ids)
        most = max(most, len(blocks))
        if len(blocks) < settings.traces:
            continue
        empty_prompt = _ids(tokenizer, empties[0]["prompt_text"])
        candidates.append(
            ProbeExample(
                prompt_id=pid,
                trace_prompt_ids=prompt_ids,
                trace_blocks=blocks[: settings.traces],
                empty_prompt_ids=empty_prompt,
                empty_block=_ids(tokenizer, empty_block),
                chosen_ids=chosen,
                rejected_ids=rejected,
            )
        )
    if not candidates:
        raise ProbeDataError(
            f"no D_t prompt has {settings.traces} stored reasoning-on traces that fit max_length "
            f"{max_length} and a reasoning-off generation (at most {most} usable traces per prompt): lower "
            "train.probe.traces or raise generation.samples_per_prompt"
        )

    def order(example: ProbeExample) -> str:
        return hashlib.sha256(f"{settings.seed}:{example.prompt_id}".encode()).hexdigest()

    return sorted(candidates, key=order)[: settings.prompts]


# -- per-sequence log-probs and gradients -------------------------------------------------------------------


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
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Summed log-probs ``[S]`` of the targets of each segment and the (sketched) gradients ``[S, D]``.

        ``states`` ``[T, H]`` predict ``targets`` ``[T]``; ``segment`` ``[T]`` says which of the ``count``
        segments each position belongs to. The head runs in chunks of positions, its weight cast once (bf16
        as in training when ``bf16``); softmax and sketches run in float32 (float64 for a float64 model).
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
        grads = torch.zeros(count, self.dim, dtype=dtype, device=device) if with_grads else None
        left: list[torch.Tensor] = []
        right: list[torch.Tensor] = []
        for start in range(0, states.shape[0], HEAD_CHUNK):
            h = states[start : start + HEAD_CHUNK].to(dtype)
            y = targets[start : start + HEAD_CHUNK]
            seg = segment[start : start + HEAD_CHUNK]
            logp = F.linear(h.to(weight.dtype), weight, bias).to(dtype).log_softmax(-1)
            logps.index_add_(0, seg, logp.gather(1, y.unsqueeze(1)).squeeze(1))
            if grads is None:
                continue
            probs = logp.exp()
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
        return logps, grads

    def stats(
        self,
        model: nn.Module,
        seqs: Sequence[tuple[list[int], list[int], list[int]]],
        pad_id: int,
        bf16: bool,
        *,
        with_grads: bool,
    ) -> SequenceStats:
        """Log-probs (and gradients) of ``(prompt, block, answer)`` sequences; each distinct prompt + block
        prefix runs through the decoder once and its KV cache serves all of its answers."""
        if with_grads and self.dim == 0:
            raise ValueError("this head-gradient backend computes log-probs only")
        head = model.get_output_embeddings()  # type: ignore[operator]
        with torch.no_grad():
            groups = _prefix_groups(seqs)
            with autocast(bf16):
                states = _shared_prefix_states(model, groups, pad_id)
            # Segments: each group's block, then each of its answers.
            parts_h: list[torch.Tensor] = []
            parts_y: list[list[int]] = []
            block_of: list[int] = []
            answer_of: dict[int, int] = {}
            for (_, block, members), (block_h, answer_hs) in zip(groups, states, strict=True):
                block_of.append(len(parts_h))
                parts_h.append(block_h)
                parts_y.append(block)
                for (index, answer), answer_h in zip(members, answer_hs, strict=True):
                    answer_of[index] = len(parts_h)
                    parts_h.append(answer_h)
                    parts_y.append(answer)
            device = parts_h[0].device
            segment = torch.cat(
                [torch.full((len(y),), i, dtype=torch.long, device=device) for i, y in enumerate(parts_y)]
            )
            targets = torch.tensor([t for y in parts_y for t in y], dtype=torch.long, device=device)
            logps, grads = self._segments(
                torch.cat(parts_h), targets, segment, len(parts_h), head, bf16, with_grads
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
        bf16: bool,
        *,
        with_grads: bool,
    ) -> SequenceStats:
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


# -- the three estimators ------------------------------------------------------------------------------------


def _dpo_coefficient(margin: torch.Tensor, beta: float) -> torch.Tensor:
    """``∂ℓ/∂m`` of ``ℓ = −log σ(β m)``: ``−β σ(−β m)``."""
    return -beta * torch.sigmoid(-beta * margin)


def example_gradients(
    stats: SequenceStats, reference: SequenceStats, num_traces: int, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """g_t ``[K, D]``, g_e ``[D]`` and the leave-out Ĝ ``[K, D]`` of one example (see the module docstring).

    Args:
        stats: the policy's statistics of :meth:`ProbeExample.sequences` (with gradients).
        reference: the reference model's statistics of the same sequences.
        num_traces: M (even, ≥ 4).
        beta: DPO temperature β.
    """
    m = num_traces
    assert stats.grads is not None
    total, grads = stats.total[: 2 * m].view(m, 2), stats.grads
    grads_t = grads[: 2 * m].view(m, 2, -1)
    ref_total, ref_answer = reference.total[: 2 * m].view(m, 2), reference.answer[: 2 * m].view(m, 2)
    chosen, rejected = torch.arange(0, m, 2), torch.arange(1, m, 2)
    # ℓ_t on disjoint trace pairs: chosen after r_{2k}, rejected after r_{2k+1}.
    margin_t = (total[chosen, 0] - ref_total[chosen, 0]) - (total[rejected, 1] - ref_total[rejected, 1])
    g_t = _dpo_coefficient(margin_t, beta).unsqueeze(1) * (grads_t[chosen, 0] - grads_t[rejected, 1])
    # ℓ_e: both answers after the empty block.
    ref_e = reference.total[2 * m :]
    margin_e = (stats.total[2 * m] - ref_e[0]) - (stats.total[2 * m + 1] - ref_e[1])
    g_e = _dpo_coefficient(margin_e, beta) * (grads[2 * m] - grads[2 * m + 1])
    # Ĝ from the other traces: self-normalized importance sampling with proposal π_ref(r|x).
    log_trace_ref = ref_total[:, 0] - ref_answer[:, 0]  # log π_ref(r_j | x)
    log_w = total - log_trace_ref.unsqueeze(1)  # [M, 2]: log π_θ(r_j, y | x) − log π_ref(r_j | x)
    g_hat = []
    for k in range(m // 2):
        keep = torch.tensor([j for j in range(m) if j // 2 != k])
        log_n = math.log(len(keep))
        marginals, log_ratio = [], []
        for a in (0, 1):
            marginals.append(marginal_gradient(grads_t[keep, a], log_w[keep, a]))
            log_policy = torch.logsumexp(log_w[keep, a], 0) - log_n  # log π̂_θ(y | x)
            log_ref = torch.logsumexp(ref_answer[keep, a], 0) - log_n  # log π̂_ref(y | x)
            log_ratio.append(log_policy - log_ref)
        coefficient = _dpo_coefficient(log_ratio[0] - log_ratio[1], beta)
        g_hat.append(coefficient * (marginals[0] - marginals[1]))
    return g_t, g_e, torch.stack(g_hat)


# -- the probe -----------------------------------------------------------------------------------------------


def _broadcast(value: float) -> float:
    """Rank 0's value on every rank (all ranks compute it; this guards against float drift)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, 0)
    return float(tensor)


class GradProbe:
    """Measures g_t, g_e and Ĝ on a fixed probe set every ``config.probe.every`` steps.

    Build it from the **reference** model (the model before training): the reference log-probs of every probe
    sequence are computed here, once. With ``config.alpha == 'auto'`` it owns the EMA of α̂*
    (:class:`~pipeline.training.alpha_star.AlphaController`); :meth:`run` returns the α to train with.

    Args:
        reference_model: the reference policy π_ref (the initial weights of the trained model).
        examples: the probe set (:func:`build_probe_examples`).
        config: the training config (β, bf16, α, the probe section).
        pad_id: padding token id.
    """

    def __init__(
        self, reference_model: nn.Module, examples: Sequence[ProbeExample], config: TrainConfig, pad_id: int
    ) -> None:
        if not examples:
            raise ProbeDataError("the probe set is empty")
        counts = {len(e.trace_blocks) for e in examples}
        if len(counts) != 1 or min(counts) < 4 or min(counts) % 2:
            raise ProbeDataError(f"every probe example needs the same even number (≥ 4) of traces: {counts}")
        self.settings = config.probe
        self.beta = config.beta
        self.bf16 = resolve_bf16(config.bf16)
        self.auto = config.alpha == "auto"
        self.examples = list(examples)
        self.num_traces = counts.pop()
        self.pad_id = pad_id
        self._gradients: _HeadGradients | _ParamGradients | None = None
        was_training = reference_model.training
        reference_model.eval()
        try:
            reference = _HeadGradients(reference_model, None)  # log-probs only
            self.reference = [
                reference.stats(reference_model, e.sequences(), pad_id, self.bf16, with_grads=False)
                for e in self.examples
            ]
        finally:
            reference_model.train(was_training)
        self.controller: AlphaController | None = None
        if self.auto and self.settings.alpha_init is not None:
            self.controller = self._controller(self.settings.alpha_init)
        self.rows: list[dict[str, Any]] = []

    def _controller(self, initial: float) -> AlphaController:
        s = self.settings
        return AlphaController(initial, decay=s.ema_decay, low=s.alpha_min, high=s.alpha_max)

    def due(self, step: int) -> bool:
        """Whether the probe runs before optimizer step ``step`` (0-based: first step, then every N)."""
        return step % self.settings.every == 0

    def measure(self, model: nn.Module) -> ProbeGradients:
        """The per-example gradients at the model's current weights (eval mode, restored afterwards)."""
        if self._gradients is None:
            self._gradients = _backend(model, self.settings)
        was_training = model.training
        model.eval()
        try:
            per_example = [
                example_gradients(
                    self._gradients.stats(model, e.sequences(), self.pad_id, self.bf16, with_grads=True),
                    reference,
                    self.num_traces,
                    self.beta,
                )
                for e, reference in zip(self.examples, self.reference, strict=True)
            ]
        finally:
            model.train(was_training)
        g_t, g_e, g_hat = (torch.stack(parts) for parts in zip(*per_example, strict=True))
        return ProbeGradients(g_t, g_e, g_hat)

    def _measure_stats(self, model: nn.Module, step: int) -> tuple[ProbeGradients, GradientStats, float]:
        started = time.perf_counter()
        grads = self.measure(model)
        settings = self.settings
        stats = estimate_gradient_stats(
            grads.g_t, grads.g_e, grads.g_hat, bootstrap=settings.bootstrap, seed=settings.seed + step
        )
        return grads, stats, time.perf_counter() - started

    def _row(
        self, step: int, alpha: float, grads: ProbeGradients, stats: GradientStats, seconds: float
    ) -> dict[str, Any]:
        mixed = alpha * grads.g_t + (1 - alpha) * grads.g_e.unsqueeze(1)
        assert self._gradients is not None
        return {
            "step": step,
            "alpha": alpha,
            "alpha_hat": stats.alpha_star,
            "ci_low": stats.ci_low,
            "ci_high": stats.ci_high,
            "numerator": stats.numerator,
            "denominator": stats.denominator,
            "trace_var_t": stats.trace_variance,
            "trace_var_c": trace_variance(mixed),
            "bias_t": stats.bias_t,
            "bias_e": stats.bias_e,
            "mse_trace": mixture_mse(1.0, grads.g_t, grads.g_e, grads.g_hat),
            "mse_empty": mixture_mse(0.0, grads.g_t, grads.g_e, grads.g_hat),
            "mse_alpha": mixture_mse(alpha, grads.g_t, grads.g_e, grads.g_hat),
            "n_prompts": stats.n,
            "pairs_per_prompt": int(grads.g_t.shape[1]),
            "dim": int(grads.g_t.shape[2]),
            "params": self._gradients.name,
            "seconds": seconds + 0.0,
        }

    def run(self, model: nn.Module, step: int, alpha: float) -> float:
        """Probe at ``step``, record a ``grad_stats`` row, and return the α to train with from here on.

        With ``alpha: auto`` that is the EMA of α̂* within ``[alpha_min, alpha_max]``; otherwise ``alpha``.
        """
        started = time.perf_counter()
        grads, stats, _ = self._measure_stats(model, step)
        if self.auto:
            if self.controller is None:
                self.controller = self._controller(stats.alpha_star)
            else:
                self.controller.update(stats.alpha_star)
            alpha = _broadcast(self.controller.value)
            self.controller.value = alpha
        self.rows.append(self._row(step, alpha, grads, stats, time.perf_counter() - started))
        return alpha

    def analyze(self, model: nn.Module, alpha: float | None = None) -> dict[str, Any]:
        """One probe without training: the ``grad_stats`` row, g_c at ``alpha`` (default: α̂*)."""
        grads, stats, seconds = self._measure_stats(model, 0)
        return self._row(0, stats.alpha_star if alpha is None else alpha, grads, stats, seconds)

    def state_dict(self) -> dict[str, Any]:
        return {
            "rows": list(self.rows),
            "controller": None if self.controller is None else self.controller.value,
            "reference": [(r.total, r.answer) for r in self.reference],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = list(state["rows"])
        value = state["controller"]
        self.controller = None if value is None else self._controller(float(value))
        if value is not None:
            self.controller.value = float(value)  # type: ignore[union-attr]  # exact, not re-clipped
        self.reference = [SequenceStats(total, answer, None) for total, answer in state["reference"]]


def build_probe(
    model: nn.Module,
    tokenizer: Any,
    pairs_trace: Sequence[dict[str, Any]],
    generations: Sequence[dict[str, Any]],
    config: TrainConfig,
) -> GradProbe:
    """The probe of a training run: the probe set from stored rows, reference log-probs from ``model``."""
    examples = build_probe_examples(tokenizer, pairs_trace, generations, config.probe, config.max_length)
    return GradProbe(model, examples, config, pad_id=tokenizer.pad_token_id)


# -- analysis without training (``bvpo analyze-variance``) --------------------------------------------------


def analyze_variance(
    model_path: str,
    pairs_trace: Sequence[dict[str, Any]],
    generations: Sequence[dict[str, Any]],
    config: TrainConfig,
    *,
    reference_path: str | None = None,
    alpha: float | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Probe ``model_path`` once on stored pairs and traces: the ``grad_stats`` row, no training.

    Args:
        reference_path: π_ref (default: the model itself, i.e. the state at step 0 of training).
        alpha: α of the mixed gradient g_c (default: the config's numeric α, else α̂*).
    """
    from pipeline.training.modeling import load_model_and_tokenizer

    reference, tokenizer = load_model_and_tokenizer(reference_path or model_path, trust_remote_code)
    probe = build_probe(reference, tokenizer, pairs_trace, generations, config)
    model = reference
    if reference_path is not None and reference_path != model_path:
        del reference
        model, _ = load_model_and_tokenizer(model_path, trust_remote_code)
    if alpha is None and config.alpha != "auto":
        alpha = config.alpha_value
    return probe.analyze(model, alpha)


VARIANCE_TABLE = (
    ("alpha_hat", "α̂*", "clip(E⟨g_e−Ĝ, g_e−g_t⟩ / E‖g_t−g_e‖², 0, 1): the MSE-optimal α"),
    ("ci", "α̂* 95% CI", "percentile bootstrap over probe prompts"),
    ("trace_var_t", "tr Var_r[g_t]", "trace-induced variance of the trace-based gradient"),
    ("trace_var_c", "tr Var_r[g_c]", "same for g_c = α g_t + (1−α) g_e (= α² tr Var_r[g_t])"),
    ("denominator", "E‖g_t − g_e‖²", "denominator of α*"),
    ("numerator", "E⟨g_e − Ĝ, g_e − g_t⟩", "numerator of α*"),
    ("bias_t", "‖E g_t − Ĝ‖", "bias of the trace-based gradient"),
    ("bias_e", "‖E g_e − Ĝ‖", "bias of the empty-trace gradient"),
    ("mse_trace", "MSE(α=1)", "E‖g_t − Ĝ‖² (DPO on traces)"),
    ("mse_empty", "MSE(α=0)", "E‖g_e − Ĝ‖² (DPO on empty traces)"),
    ("mse_alpha", "MSE(α)", "E‖g_c − Ĝ‖² at the α of g_c"),
)


def variance_table(row: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(quantity, value, meaning)`` lines of a ``grad_stats`` row, for printing."""
    lines = []
    for key, label, meaning in VARIANCE_TABLE:
        if key == "ci":
            value = f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
        elif key in ("alpha_hat",):
            value = f"{row[key]:.3f}"
        else:
            value = f"{row[key]:.4g}"
        lines.append((label, value, meaning))
    lines.append(("α of g_c", f"{row['alpha']:.3f}", "the α the mixed-gradient rows use"))
    lines.append(
        (
            "probe",
            f"{row['n_prompts']} prompts × {row['pairs_per_prompt']} trace pairs, D = {row['dim']}",
            f"params: {row['params']}; {row['seconds']:.1f} s",
        )
    )
    return lines
