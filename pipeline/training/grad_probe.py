"""Gradient-statistics probe: α̂* of the mixture the trainer uses, measured on the model being trained.

docs/method.md §Probe estimator. Every ``train.probe.every`` optimizer steps (and before step 0) the probe
takes a fixed set of D_t prompts (:mod:`pipeline.training.probe_set`) and, for each, scores the pair's
answers ``y⁺, y⁻`` after each of ``M`` stored reasoning-on traces and after the empty block, with per-sequence
(projected) gradients (:mod:`pipeline.training.probe_grads`). The reference pass, run once when the probe is
built, also gives each answer's probability under the sampler that drew the data (``q``: the stored
temperature and top-p) and each trace's ``log q(r | x)`` (the engine's stored processed log-probs when it gave
them, recomputed from the reference model otherwise). :mod:`pipeline.training.probe_estimator` turns these
into per-prompt terms under the trainer's own trace distribution (traces from the posterior ``q(r | x, y±)``,
by importance weights ``∝ q(y | x, r_j)``) and Ĝ with proposal ``q``; :mod:`pipeline.training.alpha_star`
gives α̂* and the MSE(α) curve with bootstrap intervals over prompts.

A ``grad_stats`` row holds α̂* with its interval, the MSE(α) curve on a grid with intervals, the measured
``tr Var_r[g_t]`` (weighted U-statistic over posterior trace pairs), the biases, and the effective sample
sizes
of the importance weights per prompt, with the count of prompts below ``train.probe.min_ess``.

**Why stored traces.** The generations dataset already holds ``generation.samples_per_prompt`` reasoning-on
samples per prompt. The probe reuses them instead of starting a generation engine inside the trainer (a vLLM
engine would compete with training for the accelerator's memory and cost tens of seconds to start); the price
is a self-normalized estimate (O(1/M) bias) and traces outside the sampler's support (top-p, budget) unseen.

**Cost**: ``bench/bench_probe.py`` measures the wall time the probe adds at the defaults.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import TrainConfig
from pipeline.training.alpha_star import AlphaController, GradientStats, stats_from_terms
from pipeline.training.precision import resolve_bf16
from pipeline.training.probe_estimator import PromptSamples, PromptTerms, prompt_terms
from pipeline.training.probe_grads import (
    HEAD_SKETCH_COLS,
    Sampler,
    SequenceStats,
    _backend,
    _HeadGradients,
    _ParamGradients,
    resolve_params,
)
from pipeline.training.probe_set import ProbeDataError, ProbeExample, build_probe_examples

__all__ = [
    "HEAD_SKETCH_COLS",
    "GradProbe",
    "ProbeDataError",
    "ProbeExample",
    "SequenceStats",
    "_HeadGradients",
    "_ParamGradients",
    "analyze_variance",
    "build_probe",
    "build_probe_examples",
    "prompt_samples",
    "resolve_params",
    "variance_table",
]

log = logging.getLogger(__name__)


def _trace_logq(example: ProbeExample, reference: SequenceStats) -> tuple[torch.Tensor, int]:
    """``log q(r_j | x)`` ``[M]``: stored where the engine gave processed log-probs, else recomputed; and how
    many were stored."""
    m = len(example.trace_blocks)
    assert reference.block_q is not None
    recomputed = reference.block_q[: 2 * m : 2]
    stored = example.trace_logq or [None] * m
    values = [float(r) if s is None else s for s, r in zip(stored, recomputed.tolist(), strict=True)]
    return torch.tensor(values, dtype=torch.float64), sum(s is not None for s in stored)


def _answer_logq(example: ProbeExample, reference: SequenceStats) -> tuple[torch.Tensor | None, int]:
    """``log q(y_a | x, r_j)`` of every sequence, with an answer that no stored trace's top-p nucleus holds
    (all −inf: answers not sampled by this model, or a numerical edge) weighted at the temperature without
    top-p; and how many answers needed that. None when even that is 0 everywhere (greedy sampling)."""
    assert reference.answer_q is not None and reference.answer_tempered is not None
    m = len(example.trace_blocks)
    resolved = reference.answer_q.clone()
    view, tempered = resolved[: 2 * m].view(m, 2), reference.answer_tempered[: 2 * m].view(m, 2)
    fallbacks = 0
    for a in (0, 1):
        if not bool(torch.isfinite(view[:, a]).any()):
            view[:, a] = tempered[:, a]
            fallbacks += 1
            if not bool(torch.isfinite(view[:, a]).any()):
                return None, fallbacks
    return resolved, fallbacks


def prompt_samples(
    example: ProbeExample, stats: SequenceStats, reference: SequenceStats, trace_logq: torch.Tensor
) -> PromptSamples:
    """The estimator's inputs of one prompt from the policy's and the reference pass's sequence statistics."""
    m = len(example.trace_blocks)
    assert stats.grads is not None and reference.answer_q is not None
    return PromptSamples(
        policy=stats.total[: 2 * m].view(m, 2),
        grads=stats.grads[: 2 * m].view(m, 2, -1),
        reference=reference.total[: 2 * m].view(m, 2),
        trace_logq=trace_logq,
        answer_logq=reference.answer_q[: 2 * m].view(m, 2),
        empty_policy=stats.total[2 * m :],
        empty_grads=stats.grads[2 * m :],
        empty_reference=reference.total[2 * m :],
    )


def _broadcast(value: float) -> float:
    """Rank 0's value on every rank (all ranks compute it; this guards against float drift)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, 0)
    return float(tensor)


def _reference_stats(model: nn.Module, example: ProbeExample, pad_id: int, bf16: bool) -> SequenceStats:
    sampler = Sampler(example.temperature, example.top_p, example.sampled_masks())
    return _HeadGradients(model, None).stats(
        model, example.sequences(), pad_id, bf16, with_grads=False, sampler=sampler
    )


class GradProbe:
    """Measures α*'s terms on a fixed probe set every ``config.probe.every`` steps.

    Build it from the **reference** model (the model before training): the reference log-probs and the
    sampler's ``log q`` of every probe sequence are computed here, once. Prompts whose answer no stored trace
    can lead to under the sampler (probability 0 after every trace) are left out, with a warning. With
    ``config.alpha == 'auto'`` it owns the EMA of α̂* (:class:`~pipeline.training.alpha_star.AlphaController`);
    :meth:`run` returns the α to train with.

    Raises:
        ProbeDataError: on an empty probe set, fewer than 4 traces per prompt, or no usable prompt.
    """

    def __init__(
        self, reference_model: nn.Module, examples: Sequence[ProbeExample], config: TrainConfig, pad_id: int
    ) -> None:
        if not examples:
            raise ProbeDataError("the probe set is empty")
        counts = {len(e.trace_blocks) for e in examples}
        if min(counts) < 4:
            raise ProbeDataError(f"every probe example needs at least 4 traces: {counts}")
        self.settings = config.probe
        self.beta = config.beta
        self.bf16 = resolve_bf16(config.bf16)  # "auto" resolved here: a bare string would read as true
        self.auto = config.alpha == "auto"
        self.pad_id = pad_id
        self._gradients: _HeadGradients | _ParamGradients | None = None
        was_training = reference_model.training
        reference_model.eval()
        try:
            reference = [_reference_stats(reference_model, e, pad_id, self.bf16) for e in examples]
        finally:
            reference_model.train(was_training)
        self.examples: list[ProbeExample] = []
        self.reference: list[SequenceStats] = []
        self.excluded: list[str] = []
        self.nucleus_fallback = 0  # answers outside every stored trace's top-p nucleus
        for example, ref in zip(examples, reference, strict=True):
            resolved, fallbacks = _answer_logq(example, ref)
            if resolved is None:
                self.excluded.append(example.prompt_id)
                continue
            self.nucleus_fallback += fallbacks
            self.examples.append(example)
            self.reference.append(dataclasses.replace(ref, answer_q=resolved))
        if self.excluded:
            log.warning(
                "gradient probe: %d prompt(s) left out, an answer has probability 0 under the sampler after "
                "every stored trace: %s",
                len(self.excluded),
                ", ".join(self.excluded),
            )
        if self.nucleus_fallback:
            log.warning(
                "gradient probe: %d answer(s) lie outside the top-p nucleus after every stored trace (not "
                "sampled by this model?); their posterior weights use the temperature without top-p",
                self.nucleus_fallback,
            )
        if not self.examples:
            raise ProbeDataError(
                "no probe prompt has an answer the sampler could give after its stored traces"
            )
        self._proposals = [_trace_logq(e, r) for e, r in zip(self.examples, self.reference, strict=True)]
        self.controller: AlphaController | None = None
        if self.auto and self.settings.alpha_init is not None:
            self.controller = self._controller(self.settings.alpha_init)
        self.rows: list[dict[str, Any]] = []

    @property
    def proposal(self) -> str:
        """Where ``log q(r | x)`` came from: ``stored`` (the engine's processed log-probs), ``recomputed``
        (from the reference model at the stored temperature / top-p) or ``mixed``."""
        stored = sum(n for _, n in self._proposals)
        total = sum(len(e.trace_blocks) for e in self.examples)
        return "stored" if stored == total else "recomputed" if stored == 0 else "mixed"

    def _controller(self, initial: float) -> AlphaController:
        s = self.settings
        return AlphaController(initial, decay=s.ema_decay, low=s.alpha_min, high=s.alpha_max)

    def due(self, step: int) -> bool:
        """Whether the probe runs before optimizer step ``step`` (0-based: first step, then every N)."""
        return step % self.settings.every == 0

    def measure(self, model: nn.Module) -> list[PromptTerms]:
        """The per-prompt terms at the model's current weights (eval mode, restored afterwards)."""
        if self._gradients is None:
            self._gradients = _backend(model, self.settings)
        was_training = model.training
        model.eval()
        try:
            out = []
            for example, reference, (logq, _) in zip(
                self.examples, self.reference, self._proposals, strict=True
            ):
                stats = self._gradients.stats(
                    model, example.sequences(), self.pad_id, self.bf16, with_grads=True
                )
                out.append(prompt_terms(prompt_samples(example, stats, reference, logq), self.beta))
        finally:
            model.train(was_training)
        return out

    def _measure_stats(self, model: nn.Module, step: int) -> tuple[list[PromptTerms], GradientStats, float]:
        started = time.perf_counter()
        terms = self.measure(model)

        def column(name: str) -> torch.Tensor:
            return torch.tensor([getattr(t, name) for t in terms], dtype=torch.float64)

        bias_t = torch.stack([t.mean_t - t.g_hat for t in terms]).mean(0).norm()
        bias_e = torch.stack([t.g_e - t.g_hat for t in terms]).mean(0).norm()
        stats = stats_from_terms(
            column("numerator"),
            column("denominator"),
            column("empty_error"),
            trace_variance=float(column("trace_var").nanmean()),
            bias_t=float(bias_t),
            bias_e=float(bias_e),
            bootstrap=self.settings.bootstrap,
            seed=self.settings.seed + step,
        )
        return terms, stats, time.perf_counter() - started

    def _row(
        self, step: int, alpha: float, terms: list[PromptTerms], stats: GradientStats, seconds: float
    ) -> dict[str, Any]:
        assert self._gradients is not None
        from pipeline.training.alpha_star import mse_at

        def mse(a: float) -> float:
            return mse_at(a, stats.empty_error, stats.numerator, stats.denominator)

        ess = [t.ess_posterior for t in terms]
        low = sum(e < self.settings.min_ess for e in ess)
        if low:
            log.warning(
                "gradient probe at step %d: %d of %d prompts have a posterior ESS below %.1f (min %.2f): "
                "a few traces carry the weight, α̂* is unreliable there",
                step,
                low,
                len(ess),
                self.settings.min_ess,
                min(ess),
            )
        return {
            "step": step,
            "alpha": alpha,
            "alpha_hat": stats.alpha_star,
            "ci_low": stats.ci_low,
            "ci_high": stats.ci_high,
            "numerator": stats.numerator,
            "denominator": stats.denominator,
            "empty_error": stats.empty_error,
            "trace_var_t": stats.trace_variance,
            "bias_t": stats.bias_t,
            "bias_e": stats.bias_e,
            "mse_trace": mse(1.0),
            "mse_empty": mse(0.0),
            "mse_alpha": mse(alpha),
            "alpha_grid": list(stats.alpha_grid),
            "mse_grid": list(stats.mse),
            "mse_grid_low": list(stats.mse_low),
            "mse_grid_high": list(stats.mse_high),
            "ess_posterior": ess,
            "ess_marginal": [t.ess_marginal for t in terms],
            "ess_min": min(ess),
            "low_ess_prompts": low,
            "proposal": self.proposal,
            "nucleus_fallback": self.nucleus_fallback,
            "n_prompts": stats.n,
            "traces_per_prompt": len(self.examples[0].trace_blocks),
            "dim": int(terms[0].g_e.shape[0]),
            "params": self._gradients.name,
            "seconds": seconds + 0.0,
        }

    def run(self, model: nn.Module, step: int, alpha: float) -> float:
        """Probe at ``step``, record a ``grad_stats`` row, and return the α to train with from here on.

        With ``alpha: auto`` that is the EMA of α̂* within ``[alpha_min, alpha_max]``; otherwise ``alpha``.
        """
        started = time.perf_counter()
        terms, stats, _ = self._measure_stats(model, step)
        if self.auto:
            if self.controller is None:
                self.controller = self._controller(stats.alpha_star)
            else:
                self.controller.update(stats.alpha_star)
            alpha = _broadcast(self.controller.value)
            self.controller.value = alpha
        self.rows.append(self._row(step, alpha, terms, stats, time.perf_counter() - started))
        return alpha

    def analyze(self, model: nn.Module, alpha: float | None = None) -> dict[str, Any]:
        """One probe without training: the ``grad_stats`` row, ``mse_alpha`` at ``alpha`` (default: α̂*)."""
        terms, stats, seconds = self._measure_stats(model, 0)
        return self._row(0, stats.alpha_star if alpha is None else alpha, terms, stats, seconds)

    def state_dict(self) -> dict[str, Any]:
        return {
            "rows": list(self.rows),
            "controller": None if self.controller is None else self.controller.value,
            "reference": [
                (r.total, r.answer, r.answer_q, r.block_q, r.answer_tempered) for r in self.reference
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = list(state["rows"])
        value = state["controller"]
        self.controller = None if value is None else self._controller(float(value))
        if value is not None:
            self.controller.value = float(value)  # type: ignore[union-attr]  # exact, not re-clipped
        self.reference = [SequenceStats(t, a, None, q, b, e) for t, a, q, b, e in state["reference"]]
        self._proposals = [_trace_logq(e, r) for e, r in zip(self.examples, self.reference, strict=True)]


def build_probe(
    model: nn.Module,
    tokenizer: Any,
    pairs_trace: Sequence[dict[str, Any]],
    generations: Sequence[dict[str, Any]],
    config: TrainConfig,
) -> GradProbe:
    """The probe of a training run: probe set from stored token ids, reference statistics from ``model``."""
    examples = build_probe_examples(pairs_trace, generations, config.probe, config.max_length)
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
    ("alpha_hat", "α̂*", "clip(E⟨g_e−Ĝ, g_e−g_t⟩ / E‖g_t−g_e‖², 0, 1), g_t from posterior traces"),
    ("ci", "α̂* 95% CI", "percentile bootstrap over probe prompts"),
    ("trace_var_t", "tr Var_r[g_t]", "measured: trace-induced variance of g_t (posterior traces)"),
    ("denominator", "E‖g_t − g_e‖²", "denominator of α*"),
    ("numerator", "E⟨g_e − Ĝ, g_e − g_t⟩", "numerator of α*"),
    ("bias_t", "‖E g_t − Ĝ‖", "bias of the trace-based gradient"),
    ("bias_e", "‖E g_e − Ĝ‖", "bias of the empty-trace gradient"),
    ("mse_trace", "MSE(α=1)", "E‖g_t − G‖² (DPO on traces)"),
    ("mse_empty", "MSE(α=0)", "E‖g_e − G‖² (DPO on empty traces)"),
    ("mse_alpha", "MSE(α)", "E‖g_c − G‖² at the α of the row"),
    ("ess_min", "min ESS", "smallest effective number of posterior traces of a prompt"),
)


def variance_table(row: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(quantity, value, meaning)`` lines of a ``grad_stats`` row, for printing."""
    lines = []
    for key, label, meaning in VARIANCE_TABLE:
        if key == "ci":
            value = f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
        elif key in ("alpha_hat", "ess_min"):
            value = f"{row[key]:.3f}"
        else:
            value = f"{row[key]:.4g}"
        lines.append((label, value, meaning))
    lines.append(("α of the row", f"{row['alpha']:.3f}", "the α MSE(α) is given at"))
    lines.append(
        (
            "probe",
            f"{row['n_prompts']} prompts × {row['traces_per_prompt']} stored traces, D = {row['dim']}",
            f"params: {row['params']}; q: {row['proposal']}; {row['low_ess_prompts']} low-ESS prompts; "
            f"{row['seconds']:.1f} s",
        )
    )
    return lines
