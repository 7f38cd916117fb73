"""The gradient probe (pipeline/training/grad_probe.py) on tiny models: exact gradients, α̂* against the α* of
the trainer's posterior-trace estimator computed by enumerating every trace (docs/method.md §Probe
estimator), the sampler's log-probs from the reference pass, ``alpha: auto`` through the trainer, the Prefect
flow and ``bvpo analyze-variance``.

Traces of one token make the marginal ``π(y|x) = Σ_r π(r|x) π(y|x,r)`` a sum over the vocabulary, so the true
marginal gradient G and the exact α* are computable and the estimates can be checked against them. The
estimator itself is checked against a toy model sampled at temperature 0.8 / top-p 0.9 with a trace budget in
tests/test_probe_estimator.py.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import tasks.stages  # noqa: F401  (Prefect sets up its log handlers on import: before any CliRunner swaps stderr)
from pipeline.config import ProbeConfig, TrainConfig
from pipeline.training.alpha_star import alpha_from_terms
from pipeline.training.grad_probe import (
    GradProbe,
    ProbeDataError,
    ProbeExample,
    _HeadGradients,
    _ParamGradients,
    _reference_stats,
    build_probe_examples,
    prompt_samples,
)
from pipeline.training.probe_estimator import processed_log_softmax, prompt_terms
from pipeline.training.sequences import collate, sequence_logps
from pipeline.training.trainer import BVPOTrainer, TrainingDataError
from tests.tiny_lm import VOCAB, random_pairs, tiny_model

BETA = 0.5


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Tiny models run fastest on one thread (and a shared, busy CPU makes more threads much slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _peaked(seed: int, scale: float = 40.0) -> torch.nn.Module:
    """A tiny float64 Llama whose next-token distributions are far from uniform (bigger head weights)."""
    model = tiny_model(seed, attn_implementation="sdpa")
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def _config(**overrides: Any) -> TrainConfig:
    base: dict[str, Any] = {"beta": BETA, "bf16": False, "alpha": "auto", "checkpoint_every": 0}
    base.update(overrides)
    return TrainConfig.model_validate(base)


def _sample_traces(
    model: torch.nn.Module, prompt: list[int], n: int, length: int, gen: torch.Generator
) -> list[list[int]]:
    """``n`` traces of ``length`` tokens sampled from ``model`` after ``prompt`` (ancestral sampling)."""
    ids = torch.tensor([prompt] * n)
    with torch.no_grad():
        for _ in range(length):
            probs = model(input_ids=ids).logits[:, -1].softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], dim=1)
    return ids[:, len(prompt) :].tolist()


def _examples(
    sampler: torch.nn.Module, n: int, traces: int, seed: int, length: int = 1
) -> list[ProbeExample]:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)

    def ids(k: int) -> list[int]:
        return [rng.randrange(1, VOCAB) for _ in range(k)]

    out = []
    for i in range(n):
        prompt = ids(4)
        out.append(
            ProbeExample(
                prompt_id=f"x{i}",
                trace_prompt_ids=prompt,
                trace_blocks=_sample_traces(sampler, prompt, traces, length, gen),
                empty_prompt_ids=prompt,
                empty_block=ids(2),
                chosen_ids=ids(3),
                rejected_ids=ids(3),
            )
        )
    return out


def _autograd_logps(model: torch.nn.Module, seqs: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Summed response log-probs through the training code path (``sequence_logps``)."""
    return sequence_logps(model, collate(seqs, pad_id=0))


def _grad(value: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    (g,) = torch.autograd.grad(value, [model.lm_head.weight], retain_graph=True)
    return g.flatten()


# -- the per-sequence gradients ---------------------------------------------------------------------------


def test_head_gradients_equal_autograd_exactly_and_their_sketch_is_the_projected_gradient() -> None:
    model = _peaked(0)
    (base,) = _examples(model, 1, 4, seed=3, length=2)
    # Ragged prefixes and answers: the shared-prefix KV-cache path pads both.
    blocks = [[5], [7, 8, 9], [], [11, 12, 13, 14, 15, 16]]
    example = ProbeExample(
        "x", base.trace_prompt_ids, blocks, [3, 4], [9, 9, 9], [21, 22], [23, 24, 25, 26, 27]
    )
    seqs = example.sequences()
    exact = _HeadGradients(model, dim=10**9).stats(model, seqs, 0, bf16=False, with_grads=True)
    full = [_autograd_logps(model, [(p, b + a)])[0] for p, b, a in seqs]  # one unpadded sequence each
    expected = torch.stack([_grad(logp, model) for logp in full])
    assert torch.allclose(exact.total, torch.stack(full).detach(), atol=1e-10)
    assert exact.grads is not None and exact.grads.shape == (len(seqs), VOCAB * 16)
    assert torch.allclose(exact.grads, expected, atol=1e-10)
    answers = _autograd_logps(model, [(p + b, a) for p, b, a in seqs])
    assert torch.allclose(exact.answer, answers.detach(), atol=1e-10)
    # Below the subset's size the head gradient is sketched: P_V G P_Hᵀ, never forming G.
    sketch = _HeadGradients(model, dim=128, seed=5)
    assert sketch.p_v is not None and sketch.p_h is not None and sketch.dim == 128
    projected = sketch.stats(model, seqs, 0, bf16=False, with_grads=True)
    assert projected.grads is not None
    p_v, p_h = sketch.p_v.double(), sketch.p_h.double()
    by_hand = torch.stack([p_v @ g.view(VOCAB, 16) @ p_h.T for g in expected]).flatten(1)
    assert torch.allclose(projected.grads, by_hand, atol=1e-9)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_prefix_states_equal_the_kv_cache_path(attention: str) -> None:
    """The packed unit rows (each prompt and block run once, 4D mask) give the states of the padded
    KV-cache path: ragged and empty blocks, answers of one token, two prompts, unit rows in two batches."""
    from pipeline.training import probe_grads

    model = tiny_model(1, attn_implementation=attention)
    groups = probe_grads._prefix_groups(
        [
            ([2, 3, 4], [5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22]),
            ([2, 3, 4], [5, 6, 7, 8, 9, 10, 11, 12], [23]),
            ([2, 3, 4], [5, 13], [20, 21, 22]),
            ([2, 3, 4], [], [24, 25]),
            ([2, 3, 4], [], [26]),
            ([7, 8], [9, 10, 11, 12, 13, 14, 15], [27, 28, 29, 30]),
        ]
    )
    assert len(probe_grads._unit_buckets([8 + 2, 2 + 2, 1, 7 + 3])) > 1
    with torch.no_grad():
        packed = probe_grads._packed_prefix_states(model, groups, 0)
        cached = probe_grads._shared_prefix_states(model, groups, 0)
    for (block_p, answers_p), (block_c, answers_c) in zip(packed, cached, strict=True):
        assert block_p.shape == block_c.shape and torch.allclose(block_p, block_c, atol=1e-10)
        for a_p, a_c in zip(answers_p, answers_c, strict=True):
            assert a_p.shape == a_c.shape and torch.allclose(a_p, a_c, atol=1e-10)


def test_head_follows_the_resolved_bf16_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """``train.bf16: auto`` where bf16 is not native runs the head in float32, like the training (the raw
    string "auto" must not switch the head's matmul to bf16)."""
    import pipeline.training.precision as precision

    monkeypatch.setattr(precision, "bf16_is_fast", lambda: False)
    model = tiny_model(2, dtype=torch.float32)
    seqs = _examples(model, 1, 4, seed=1, length=2)[0].sequences()
    backend = _HeadGradients(model, dim=128, seed=0)
    auto = backend.stats(model, seqs, 0, "auto", with_grads=True)
    fp32 = backend.stats(model, seqs, 0, False, with_grads=True)
    low = backend.stats(model, seqs, 0, True, with_grads=True)
    assert torch.equal(auto.total, fp32.total) and auto.grads is not None and fp32.grads is not None
    assert torch.equal(auto.grads, fp32.grads)
    assert not torch.equal(low.total, fp32.total)


def test_lora_gradients_are_the_autograd_gradients_of_the_adapters() -> None:
    """With LoRA on, ``params: auto`` probes the adapters: per-sequence autograd, exact below D weights."""
    from pipeline.config import LoraSettings
    from pipeline.training.grad_probe import _backend, resolve_params
    from pipeline.training.run import apply_training_options

    config = _config(lora=LoraSettings(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    model = apply_training_options(_peaked(0), config)
    with torch.no_grad():  # B = 0 at initialization; give the adapters weights so every gradient is non-zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(7))
    assert resolve_params(model, config.probe) == "lora"
    assert resolve_params(_peaked(0), config.probe) == "head"
    (example,) = _examples(model, 1, 4, seed=3, length=2)
    backend = _backend(model, config.probe)
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert isinstance(backend, _ParamGradients) and backend.dim == sum(p.numel() for p in adapters)
    stats = backend.stats(model, example.sequences(), 0, False, with_grads=True)
    for row, (prompt, block, answer) in enumerate(example.sequences()):
        logp = _autograd_logps(model, [(prompt, block + answer)])[0]
        expected = torch.cat([g.flatten() for g in torch.autograd.grad(logp, adapters)])
        assert torch.allclose(stats.grads[row], expected, atol=1e-10)  # type: ignore[index]
        assert float(stats.total[row]) == pytest.approx(float(logp.detach()), abs=1e-10)
    # Above D weights, a count sketch: unbiased, so ‖S g‖² averages to ‖g‖² over seeds.
    g = stats.grads[0]  # type: ignore[index]
    norms = []
    for seed in range(200):
        sketch = _ParamGradients("lora", adapters, dim=16, seed=seed)
        offsets = [0, *itertools.accumulate(p.numel() for p in adapters)]
        parts = [g[a:b].view_as(p) for a, b, p in zip(offsets, offsets[1:], adapters, strict=False)]
        norms.append(float(sketch._project(parts).pow(2).sum()))
    spread = torch.tensor(norms)
    assert float(spread.mean()) == pytest.approx(
        float(g.pow(2).sum()), abs=4 * float(spread.std()) / math.sqrt(200)
    )


def test_random_projections_preserve_the_probe_quantities_in_expectation() -> None:
    """E[SᵀS] = I: averaged over projection seeds, the sketched α* terms equal the exact ones."""
    model = _peaked(0)
    examples = _examples(model, 2, 6, seed=4, length=2)
    exact = _HeadGradients(model, dim=10**9)
    ref = [_reference_stats(model, e, 0, False) for e in examples]
    stats = [exact.stats(model, e.sequences(), 0, False, with_grads=True) for e in examples]

    def terms(per_example: list[Any]) -> torch.Tensor:
        out = []
        for e, s, r in zip(examples, per_example, ref, strict=True):
            logq = r.block_q[: 2 * 6 : 2]  # type: ignore[index]
            t = prompt_terms(prompt_samples(e, s, r, logq), BETA)
            out.append(torch.tensor([t.numerator, t.denominator]))
        return torch.stack(out).mean(0)

    target = terms(stats)
    head_sketches, count_sketches = [], []
    for seed in range(300):
        sk = _HeadGradients(model, dim=64, seed=seed)
        p_v, p_h = sk.p_v, sk.p_h
        assert p_v is not None and p_h is not None
        head_sketches.append(terms([_replace_grads(s, _kron(p_v, p_h)) for s in stats]))
        cs = _ParamGradients("head", [model.lm_head.weight], dim=64, seed=seed)
        count_sketches.append(terms([_replace_grads(s, _counted(cs)) for s in stats]))
    for draws in (torch.stack(head_sketches), torch.stack(count_sketches)):
        mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
        assert torch.all((mean - target).abs() < 4 * se + 1e-12), (mean, target, se)
        assert torch.all(draws.std(0) > 0)  # a real projection, not the identity


def _kron(p_v: torch.Tensor, p_h: torch.Tensor) -> Any:
    return lambda g: (p_v.double() @ g.view(VOCAB, 16) @ p_h.double().T).flatten()


def _counted(sketch: _ParamGradients) -> Any:
    return lambda g: sketch._project([g.view(VOCAB, 16)])


def _replace_grads(stats: Any, project: Any) -> Any:
    from pipeline.training.grad_probe import SequenceStats

    return SequenceStats(stats.total, stats.answer, torch.stack([project(g) for g in stats.grads]))


# -- the marginal gradient and α* against exact enumeration ------------------------------------------------


def _exact_quantities(
    policy: torch.nn.Module, reference: torch.nn.Module, example: ProbeExample
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Enumerate every one-token trace r: exact G, g_e, g_t(r⁺, r⁻) and the trainer's trace distributions.

    The traces were sampled from π_ref at temperature 1 without top-p, so given the kept answer y the
    trainer's trace is a draw from the posterior ``π_ref(r | x, y) ∝ π_ref(r | x) π_ref(y | x, r)``. G and
    g_e come from autograd of the losses; the V per-trace gradients from the closed-form head gradients
    (checked against autograd above). Returns G ``[D]``, g_e ``[D]``, g_t ``[V, V, D]``, the posteriors of
    y⁺, y⁻ ``[V]`` each.
    """
    prompt, y_pos, y_neg = example.trace_prompt_ids, example.chosen_ids, example.rejected_ids
    all_r = [[r] for r in range(VOCAB)]

    def logps(model: torch.nn.Module, answer: list[int]) -> torch.Tensor:
        return _autograd_logps(model, [(prompt, r + answer) for r in all_r])  # log π(r, y | x), [V]

    with torch.no_grad():
        ref_pos, ref_neg = logps(reference, y_pos), logps(reference, y_neg)
    # G: the gradient of the marginal DPO loss, log π(y|x) = logsumexp_r log π(r, y|x).
    pol_pos, pol_neg = logps(policy, y_pos), logps(policy, y_neg)
    margin = (pol_pos.logsumexp(0) - ref_pos.logsumexp(0)) - (pol_neg.logsumexp(0) - ref_neg.logsumexp(0))
    g_exact = _grad(-F.logsigmoid(BETA * margin), policy)
    # g_e.
    empty = [(example.empty_prompt_ids, example.empty_block + a) for a in (y_pos, y_neg)]
    with torch.no_grad():
        ref_e = _autograd_logps(reference, empty)
    pol_e = _autograd_logps(policy, empty)
    g_e = _grad(-F.logsigmoid(BETA * ((pol_e[0] - ref_e[0]) - (pol_e[1] - ref_e[1]))), policy)
    # g_t(r⁺, r⁻) = c(r⁺, r⁻) (∇ log π(r⁺, y⁺) − ∇ log π(r⁻, y⁻)).
    seqs = [(prompt, r, y) for r in all_r for y in (y_pos, y_neg)]
    per_trace = _HeadGradients(policy, dim=10**9).stats(policy, seqs, 0, False, with_grads=True).grads
    assert per_trace is not None
    grad_pos, grad_neg = per_trace[0::2], per_trace[1::2]
    m = (pol_pos.detach() - ref_pos).unsqueeze(1) - (pol_neg.detach() - ref_neg).unsqueeze(0)
    coefficient = -BETA * torch.sigmoid(-BETA * m)  # [V, V]
    g_t = coefficient.unsqueeze(-1) * (grad_pos.unsqueeze(1) - grad_neg.unsqueeze(0))
    return g_exact, g_e, g_t, ref_pos.softmax(0), ref_neg.softmax(0)


def _snis_standard_error(probe: GradProbe, policy: torch.nn.Module, index: int) -> float:
    """Delta-method standard error of the self-normalized Ĝ of an example from all its M traces.

    For each answer, ``SE² = Σ_j w_j² ‖∇ log π(r_j, y) − Ĝ_y‖²``; Ĝ = c (Ĝ_{y⁺} − Ĝ_{y⁻}) adds them (× c²).
    """
    example, ref = probe.examples[index], probe.reference[index]
    m = len(example.trace_blocks)
    stats = _HeadGradients(policy, dim=10**9).stats(policy, example.sequences(), 0, False, with_grads=True)
    assert stats.grads is not None
    total, grads = stats.total[: 2 * m].view(m, 2), stats.grads[: 2 * m].view(m, 2, -1)
    log_q = (ref.total[: 2 * m : 2] - ref.answer[: 2 * m : 2]).unsqueeze(1)  # temperature 1: q = π_ref
    log_w = total - log_q
    variance, log_ratio = 0.0, []
    for a in (0, 1):
        w = log_w[:, a].softmax(0)
        mean = w @ grads[:, a]
        variance += float((w.pow(2) * (grads[:, a] - mean).pow(2).sum(-1)).sum())
        log_ratio.append(
            float(log_w[:, a].logsumexp(0) - (ref.total[: 2 * m].view(m, 2)[:, a] - log_q[:, 0]).logsumexp(0))
        )
    c = BETA * torch.sigmoid(torch.tensor(-BETA * (log_ratio[0] - log_ratio[1])))
    return float(c) * math.sqrt(variance)


def test_probe_estimates_converge_to_the_exact_marginal_gradient_and_alpha_star() -> None:
    """Policy ≠ reference (the importance weights matter); traces sampled from π_ref, as stored traces are.

    Ĝ must lie within 3 delta-method standard errors of G (the SE is itself checked to be small), the
    posterior-weighted mean of g_t must match the exact posterior mean, the measured tr Var[g_t] the exact
    one, and α̂* the exact α* of the trainer's estimator within 0.03.
    """
    policy, reference = _peaked(0, scale=10.0), _peaked(1, scale=10.0)
    with torch.no_grad():  # a policy some way from the reference
        for p, q in zip(policy.parameters(), reference.parameters(), strict=True):
            p.copy_(q + 0.3 * (p - q))
    examples = _examples(reference, 3, 200, seed=11)
    probe = GradProbe(reference, examples, _config(probe=ProbeConfig(traces=200)), pad_id=0)
    assert probe.proposal == "recomputed"
    terms = probe.measure(policy)
    assert terms[0].g_hat.shape == (VOCAB * 16,)
    num, den, var = [], [], []
    for i, example in enumerate(examples):
        g_exact, g_e, g_t, post_pos, post_neg = _exact_quantities(policy, reference, example)
        se = _snis_standard_error(probe, policy, i)
        assert float((terms[i].g_hat - g_exact).norm()) < 3 * se
        assert se < 0.2 * float(g_exact.norm())
        assert torch.allclose(terms[i].g_e, g_e, atol=1e-10)
        joint = post_pos.unsqueeze(1) * post_neg.unsqueeze(0)  # r⁺, r⁻ independent posterior draws
        mean_t = (joint.unsqueeze(-1) * g_t).sum((0, 1))
        num.append(float((g_e - g_exact) @ (g_e - mean_t)))
        den.append(float((joint * (g_t - g_e).pow(2).sum(-1)).sum()))
        var.append(float((joint * (g_t - mean_t).pow(2).sum(-1)).sum()))
        assert float((terms[i].mean_t - mean_t).norm() / mean_t.norm()) < 0.25
    alpha_exact = min(1.0, max(0.0, sum(num) / sum(den)))
    alpha_hat = alpha_from_terms(
        torch.tensor([t.numerator for t in terms]), torch.tensor([t.denominator for t in terms])
    )
    assert 0.05 < alpha_exact < 0.95  # an interior optimum, so the check is not trivially at a bound
    assert alpha_hat == pytest.approx(alpha_exact, abs=0.03)
    assert sum(t.denominator for t in terms) / 3 == pytest.approx(sum(den) / 3, rel=0.05)
    assert sum(t.trace_var for t in terms) == pytest.approx(sum(var), rel=0.15)


# -- the sampler's log-probs from the reference pass -------------------------------------------------------


def test_reference_pass_gives_the_processed_sampler_log_probs_of_sampled_tokens() -> None:
    """At temperature 0.8 / top-p 0.9: ``log q(y | x, r)`` sums the processed log-probs of every answer token
    and ``log q(r | x)`` those of the block's sampled tokens only (prefilled and forced tokens have q = 1),
    each computed here from one full forward pass per sequence, without the probe's shared-prefix cache."""
    model = _peaked(0, scale=5.0)
    (base,) = _examples(model, 1, 4, seed=3, length=4)
    sampled = [[False, True, True, False], [False, True, True, True], [True] * 4, [False, False, True, False]]
    example = ProbeExample(
        "x", base.trace_prompt_ids, base.trace_blocks, [3, 4], [9, 9], base.chosen_ids, base.rejected_ids,
        block_sampled=sampled, temperature=0.8, top_p=0.9,
    )  # fmt: skip
    ref = _reference_stats(model, example, 0, False)
    assert ref.answer_q is not None and ref.block_q is not None
    for row, ((prompt, block, answer), (block_mask, _)) in enumerate(
        zip(example.sequences(), example.sampled_masks(), strict=True)
    ):
        ids = torch.tensor([prompt + block + answer])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        q = processed_log_softmax(logits, 0.8, 0.9).gather(1, ids[0, len(prompt) :].unsqueeze(1)).squeeze(1)
        tempered = (logits / 0.8).log_softmax(-1).gather(1, ids[0, len(prompt) :].unsqueeze(1)).squeeze(1)
        q_block = torch.where(torch.isinf(q[: len(block)]), tempered[: len(block)], q[: len(block)])
        expected_block = float(q_block[torch.tensor(block_mask, dtype=torch.bool)].sum()) if block else 0.0
        assert float(ref.block_q[row]) == pytest.approx(expected_block, abs=1e-9)
        assert float(ref.answer_q[row]) == pytest.approx(float(q[len(block) :].sum()), abs=1e-9)
    assert not torch.allclose(ref.answer_q, ref.answer)  # q is not the raw model distribution


# -- the probe set from stored rows -----------------------------------------------------------------------


def _gen(
    pid: str, mode: str, i: int, trace: list[int] | None, answer: list[int], forced: bool = False
) -> dict[str, Any]:
    """A stored generation as token ids: open tag [5] prefilled, the trace sampled, close tag [6] sampled or
    forced, the answer, EOS [1]; reasoning-off: the empty block [5, 6] prefilled."""
    if mode == "trace":
        assert trace is not None
        block, segs = [5, *trace, 6], [0] + [1] * len(trace) + [2 if forced else 1]
    else:
        block, segs = [5, 6], [0, 0]
    response = block + answer + [1]
    segments = segs + [3] * len(answer) + [4]
    processed = [0.0 if s in (0, 2) else -0.5 for s in segments]
    return {
        "generation_id": f"{pid}-{mode}-{i}",
        "prompt_id": pid,
        "mode": mode,
        "sample_index": i,
        "prompt_token_ids": [2, 3] if mode == "trace" else [2, 4],
        "response_token_ids": response,
        "response_segments": segments,
        "eos_emitted": True,
        "sampler_processed_logprobs": processed,
        "temperature": 0.8,
        "top_p": 0.95,
    }


def _pair(pid: str, chosen: int = 0, rejected: int = 1) -> dict[str, Any]:
    return {
        "pair_id": f"{pid}-trace",
        "prompt_id": pid,
        "chosen_generation_id": f"{pid}-trace-{chosen}",
        "rejected_generation_id": f"{pid}-trace-{rejected}",
    }


def test_probe_examples_take_stored_token_ids_of_qualifying_prompts() -> None:
    gens = []
    for pid, n_traces in (("a", 4), ("b", 3), ("c", 4), ("d", 5)):
        gens += [
            _gen(pid, "trace", i, [10 + i] * (i + 1), [20 + i, 30], forced=i == 2) for i in range(n_traces)
        ]
        if pid != "c":  # c has no reasoning-off generation
            gens.append(_gen(pid, "empty", 0, None, [40]))
    gens[-2]["response_token_ids"] = [5] + [7] * 40 + [6, 20, 1]  # d's sample 4: a long trace
    gens[-2]["response_segments"] = [0] + [1] * 40 + [1, 3, 4]
    gens[-2]["sampler_processed_logprobs"] = None  # and no processed log-probs
    pairs = [_pair(p) for p in "abcd"]
    examples = build_probe_examples(pairs, gens, ProbeConfig(prompts=4, traces=4), max_length=512)
    assert sorted(e.prompt_id for e in examples) == ["a", "d"]
    d = next(e for e in examples if e.prompt_id == "d")
    assert d.trace_blocks == [[5, *([10 + i] * (i + 1)), 6] for i in range(4)]
    assert d.block_sampled is not None and d.block_sampled[2] == [False, True, True, True, False]  # forced
    assert d.block_sampled[0] == [False, True, True]
    assert d.trace_logq == [-1.0, -1.5, -1.5, -2.5]  # trace tokens only: not the prefilled or forced tag
    assert d.chosen_ids == [20, 30, 1] and d.rejected_ids == [21, 30, 1]  # the pair's answers, with EOS
    assert d.trace_prompt_ids == [2, 3] and d.empty_prompt_ids == [2, 4] and d.empty_block == [5, 6]
    assert (d.temperature, d.top_p) == (0.8, 0.95)
    # One prompt: which one depends on the seed only.
    picks = {
        build_probe_examples(pairs, gens, ProbeConfig(prompts=1, seed=s), 512)[0].prompt_id for s in range(8)
    }
    assert picks == {"a", "d"}
    # Traces that do not fit max_length are not used; d's long sample 4 only fits a long max_length.
    five = build_probe_examples(pairs, gens, ProbeConfig(prompts=4, traces=5), max_length=512)
    assert [e.prompt_id for e in five] == ["d"] and five[0].trace_logq[-1] is None  # type: ignore[index]
    with pytest.raises(ProbeDataError, match="stored reasoning-on traces"):
        build_probe_examples(pairs, gens, ProbeConfig(traces=5), max_length=30)
    with pytest.raises(ProbeDataError, match="samples_per_prompt"):
        build_probe_examples(pairs, gens, ProbeConfig(traces=6), max_length=512)
    text_only = [{k: v for k, v in g.items() if k != "response_segments"} for g in gens]
    with pytest.raises(ProbeDataError, match="token ids"):
        build_probe_examples(pairs, text_only, ProbeConfig(traces=4), max_length=512)


# -- alpha: auto through the trainer ----------------------------------------------------------------------


def _auto_trainer(config: TrainConfig, seed: int = 0) -> BVPOTrainer:
    model = _peaked(seed)
    examples = _examples(model, 3, 6, seed=5, length=2)
    probe = GradProbe(model, examples, config, pad_id=0)
    return BVPOTrainer(model, random_pairs(6, 1, "t"), random_pairs(6, 2, "e"), config, 0, probe=probe)


def test_alpha_auto_changes_alpha_over_steps_records_it_and_resumes_exactly(tmp_path: Path) -> None:
    import pyarrow as pa

    from pipeline.training.grad_plots import plot_grad_stats
    from storage import conform

    config = _config(
        batch_size=2,
        max_steps=7,
        learning_rate=3e-2,
        warmup_steps=0,
        max_grad_norm=1e9,
        probe=ProbeConfig(every=2, traces=6, ema_decay=0.5, alpha_min=0.05, alpha_max=0.95, bootstrap=50),
    )
    trainer = _auto_trainer(config)
    metrics = trainer.train()
    rows = trainer.probe.rows  # type: ignore[union-attr]
    assert [r["step"] for r in rows] == [0, 2, 4, 6]
    # α of each training step is the probe's α from the probe at or before it (EMA of α̂*, within bounds).
    for m in metrics:
        probe_row = max((r for r in rows if r["step"] <= m["step"] - 1), key=lambda r: r["step"])
        assert m["alpha"] == probe_row["alpha"]
    assert rows[0]["alpha"] == pytest.approx(min(0.95, max(0.05, rows[0]["alpha_hat"])))
    for prev, row in itertools.pairwise(rows):
        ema = 0.5 * prev["alpha"] + 0.5 * row["alpha_hat"]
        assert row["alpha"] == pytest.approx(min(0.95, max(0.05, ema)))
    assert len({m["alpha"] for m in metrics}) >= 3  # α moves as training changes the gradients
    assert all(0.05 <= m["alpha"] <= 0.95 for m in metrics)
    for row in rows:
        assert row["ci_low"] <= row["alpha_hat"] <= row["ci_high"]
        # Effective sample sizes lie in [1, M] (M = 6 traces) and the flag counts those below min_ess.
        assert all(1.0 - 1e-9 <= e <= 6.0 + 1e-9 for e in row["ess_posterior"] + row["ess_marginal"])
        assert row["low_ess_prompts"] == sum(e < config.probe.min_ess for e in row["ess_posterior"])
        assert len(row["mse_grid"]) == len(row["alpha_grid"]) == 11 and math.isfinite(row["trace_var_t"])
        assert all(
            lo <= m <= hi
            for lo, m, hi in zip(row["mse_grid_low"], row["mse_grid"], row["mse_grid_high"], strict=True)
        )
    # Rows are grad_stats rows.
    table = conform("grad_stats", pa.Table.from_pylist(rows))
    assert table.num_rows == 4
    assert plot_grad_stats(rows, tmp_path / "g.png", metrics=metrics).stat().st_size > 10_000

    # Resuming from step 3 reproduces α, the probe rows and the losses of the uninterrupted run.
    first = _auto_trainer(config)
    first.train(state_dir=tmp_path / "state", stop_after=3)
    first.save_state(tmp_path / "state")
    resumed = _auto_trainer(config, seed=0)
    assert resumed.resume_from(tmp_path / "state") and resumed.step == 3
    resumed.train()
    assert [m["alpha"] for m in resumed.metrics] == [m["alpha"] for m in metrics]
    assert [m["loss"] for m in resumed.metrics] == pytest.approx([m["loss"] for m in metrics], abs=1e-9)
    assert [r["alpha_hat"] for r in resumed.probe.rows] == pytest.approx(  # type: ignore[union-attr]
        [r["alpha_hat"] for r in rows], abs=1e-9
    )


def test_fixed_alpha_keeps_alpha_and_auto_needs_a_probe() -> None:
    config = _config(alpha=0.4, max_steps=3, probe=ProbeConfig(enabled=True, every=2, traces=6, bootstrap=20))
    assert config.probe_active and not _config(alpha=0.4).probe_active
    trainer = _auto_trainer(config)
    metrics = trainer.train()
    assert [m["alpha"] for m in metrics] == [0.4, 0.4, 0.4]
    assert [r["alpha"] for r in trainer.probe.rows] == [0.4, 0.4]  # type: ignore[union-attr]
    with pytest.raises(TrainingDataError, match="gradient probe"):
        BVPOTrainer(tiny_model(), random_pairs(2, 1, "t"), random_pairs(2, 2, "e"), _config(), 0)


# -- run.py, the Prefect flow and the CLI on a tiny checkpoint with a tokenizer ------------------------------

WORDS = ["alpha", "beta", "gamma", "delta", "sigma", "omega", "seven", "three", "blue", "green"]


def _register_run(workspace: Path, model_dir: Path) -> dict[str, Any]:
    """prompts → generations (varied traces) → scores → D_t, D_e → ref_logps, as data_refresh writes them."""
    import pyarrow as pa

    from pipeline.training.reference import compute_reference_logps
    from storage import DatasetStore, schema_for
    from tests.tiny_checkpoint import EOS_ID, char_ids

    rng = random.Random(0)
    store = DatasetStore(workspace)

    def put(kind: str, rows: list[dict[str, Any]], parents: list[Any]) -> Any:
        schema = schema_for(kind)
        table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)
        return store.put(kind, table, config={"test": kind}, parents=parents)

    prompts = [
        {"prompt_id": f"p{i}", "prompt": f"What is {i}+{i}?", "split": "train", "task_type": "math",
         "reference_answer": str(2 * i), "constraints": "[]", "source": "test"}
        for i in range(4)
    ]  # fmt: skip
    gens = []
    for p in prompts:
        for mode in ("trace", "empty"):
            for i in range(4):
                trace = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
                block = f"<think>\n{trace}\n</think>\n\n" if mode == "trace" else "<think>\n\n</think>\n\n"
                answer = f"It is {rng.randint(0, 9)}."
                prompt_text = f"<|user|>{p['prompt']}\n<|assistant|>"
                if mode == "trace":
                    pieces = [("<think>\n", 0), (trace, 1), ("\n</think>\n\n", 1), (answer, 3)]
                else:
                    pieces = [(block, 0), (answer, 3)]
                ids = [t for text, _ in pieces for t in char_ids(text)] + [EOS_ID]
                segments = [seg for text, seg in pieces for _ in text] + [4]
                gens.append(
                    dict(
                        generation_id=f"{p['prompt_id']}-{mode}-{i}",
                        prompt_id=p["prompt_id"],
                        mode=mode,
                        sample_index=i,
                        model="tiny",
                        prompt_text=f"<|user|>{p['prompt']}\n<|assistant|>",
                        response_text=block + answer,
                        trace=trace if mode == "trace" else None,
                        answer=answer,
                        trace_tokens=len(trace) if mode == "trace" else 0,
                        answer_tokens=len(answer),
                        finish_reason="stop",
                        trace_closed=mode == "trace",
                        budget_forced=False,
                        parse_ok=True,
                        reasoning_control="prefill",
                        prompt_token_ids=char_ids(prompt_text),
                        response_token_ids=ids,
                        response_segments=segments,
                        eos_emitted=True,
                        temperature=0.8,
                        top_p=0.95,
                    )
                )
    refs = {"prompts": put("prompts", prompts, [])}
    refs["generations"] = put("generations", gens, [refs["prompts"]])
    refs["scores"] = put("scores", [], [refs["prompts"], refs["generations"]])
    pairs: dict[str, list[dict[str, Any]]] = {"trace": [], "empty": []}
    for p in prompts:
        for mode in ("trace", "empty"):
            best, worst = [g for g in gens if g["prompt_id"] == p["prompt_id"] and g["mode"] == mode][:2]
            pairs[mode].append(
                dict(
                    pair_id=f"{p['prompt_id']}-{mode}",
                    prompt_id=p["prompt_id"],
                    mode=mode,
                    prompt_text=best["prompt_text"],
                    chosen_response=best["response_text"],
                    rejected_response=worst["response_text"],
                    chosen_answer=best["answer"],
                    rejected_answer=worst["answer"],
                    chosen_score=1.0,
                    rejected_score=0.0,
                    margin=1.0,
                    chosen_generation_id=best["generation_id"],
                    rejected_generation_id=worst["generation_id"],
                    prompt_token_ids=best["prompt_token_ids"],
                    chosen_token_ids=best["response_token_ids"],
                    rejected_token_ids=worst["response_token_ids"],
                )
            )
    parents = [refs["generations"], refs["scores"]]
    refs["pairs_trace"] = put("pairs_trace", pairs["trace"], parents)
    refs["pairs_empty"] = put("pairs_empty", pairs["empty"], parents)
    ref_rows = compute_reference_logps(
        str(model_dir), pairs, model_label="tiny", max_length=256, bf16=False
    ).rows
    refs["ref_logps"] = put("ref_logps", ref_rows, [refs["pairs_trace"], refs["pairs_empty"]])
    refs["rows"] = {"generations": gens, "pairs": pairs, "ref_logps": ref_rows}
    return refs


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    from tests.tiny_checkpoint import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("probe-run")
    model_dir = save_tiny_checkpoint(root / "model", hidden=32)
    return root / "ws", model_dir, _register_run(root / "ws", model_dir)


def test_train_bvpo_with_alpha_auto_returns_probe_rows(tiny_run: Any, tmp_path: Path) -> None:
    from pipeline.training.run import train_bvpo

    _, model_dir, refs = tiny_run
    rows = refs["rows"]
    config = _config(max_steps=4, batch_size=2, max_length=256, probe=ProbeConfig(every=2, bootstrap=50))
    args = (str(model_dir), rows["pairs"]["trace"], rows["pairs"]["empty"], rows["ref_logps"], config)
    with pytest.raises(TrainingDataError, match="generations"):
        train_bvpo(*args, tmp_path / "ckpt")
    result = train_bvpo(*args, tmp_path / "ckpt", generations=rows["generations"])
    assert [r["step"] for r in result.grad_stats] == [0, 2]
    assert result.grad_stats[0]["n_prompts"] == 4 and result.grad_stats[0]["params"] == "head"
    assert [m["alpha"] for m in result.metrics][:2] == [result.grad_stats[0]["alpha"]] * 2
    assert result.metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # π_θ = π_ref at step 1


def test_analyze_variance_cli_prints_the_table(tiny_run: Any) -> None:
    from typer.testing import CliRunner

    from flows.cli import analyze_variance, app

    workspace, model_dir, _ = tiny_run
    runner = CliRunner()
    base = ["analyze-variance", "-w", str(workspace), "--model", str(model_dir)]
    result = runner.invoke(app, [*base, "--alpha", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["alpha"] == 0.5 and 0.0 <= row["alpha_hat"] <= 1.0 and row["n_prompts"] == 4
    # No processed log-probs stored: log q(r|x) is recomputed at the rows' temperature 0.8 / top-p 0.95.
    assert row["proposal"] == "recomputed" and len(row["ess_posterior"]) == 4
    assert row["mse_alpha"] == pytest.approx(row["mse_grid"][5], rel=1e-9)  # α = 0.5 is grid point 5
    table = runner.invoke(app, [*base, "--set", "train.probe.prompts=2"])
    assert table.exit_code == 0, table.output
    assert "α̂*" in table.stdout and "min ESS" in table.stdout and "2 prompts" in table.stdout
    bad = runner.invoke(app, [*base, "--pairs", "pairs_empty"])
    assert bad.exit_code == 1 and "not pairs_trace" in bad.output
    shown = runner.invoke(app, ["analyze-variance", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert "tr Var_r(g_t)" in shown.output  # nothing eaten by rich markup
    examples = [line.strip() for line in (analyze_variance.__doc__ or "").splitlines() if "bvpo " in line]
    assert shown.exit_code == 0 and len(examples) >= 3
    assert all(example in shown.output for example in examples)


def test_train_flow_registers_grad_stats_and_publishes_its_plot(tiny_run: Any, tmp_path: Path) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import DataRefreshOutput, train_bvpo
    from pipeline.config import PipelineConfig
    from storage import DatasetStore

    workspace, model_dir, refs = tiny_run
    config = PipelineConfig.model_validate(
        {
            "workspace": str(workspace),
            "model": {"name_or_path": str(model_dir)},
            "train": {"alpha": "auto", "max_steps": 3, "batch_size": 2, "bf16": False, "max_length": 256,
                      "probe": {"every": 2, "bootstrap": 50}},
        }
    )  # fmt: skip
    data = DataRefreshOutput(**{k: refs[k] for k in DataRefreshOutput.model_fields})
    with prefect_test_harness(server_startup_timeout=120):
        out = train_bvpo(config, data)
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            keys = {a.key for a in client.read_artifacts()}
    assert out.grad_stats is not None and out.grad_stats.kind == "grad_stats"
    store = DatasetStore(workspace)
    rows = store.read_rows(out.grad_stats)
    metrics = store.read_rows(out.metrics)
    assert [r["step"] for r in rows] == [0, 2]
    assert [m["alpha"] for m in metrics] == [rows[0]["alpha"]] * 2 + [rows[1]["alpha"]]
    assert {"grad-stats", "grad-stats-plot"} <= keys
    assert (workspace / "reports" / f"{out.grad_stats.name}-{out.grad_stats.version}.png").is_file()


# -- the embedded SmolLM2-135M (e2e) ----------------------------------------------------------------------


def _embedded_rows(tokenizer: Any) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Token-exact generations (4 per prompt and mode, temperature 0.8 / top-p 0.95, odd traces closed by the
    model, even ones by the budget) of four chat prompts, and a pair per prompt and mode."""
    from pipeline.training.encoding import encode_text

    rng = random.Random(0)
    questions = ["What is 7 + 5?", "Name a primary color.", "What is 9 times 3?", "Greet me in lowercase."]
    gens: list[dict[str, Any]] = []
    pairs: dict[str, list[dict[str, Any]]] = {"trace": [], "empty": []}
    for i, question in enumerate(questions):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        for mode in ("trace", "empty"):
            for k in range(4):
                steps = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 30)))
                if mode == "trace":
                    pieces = [("<think>\n", 0), (steps, 1), ("\n</think>\n\n", 1 if k % 2 else 2)]
                else:
                    pieces = [("<think>\n\n</think>\n\n", 0)]
                pieces.append((f"The answer is {rng.randint(0, 30)}.", 3))
                ids, segments = [], []
                for text, segment in pieces:
                    piece = encode_text(tokenizer, text)
                    ids += piece
                    segments += [segment] * len(piece)
                gens.append(
                    {"generation_id": f"q{i}-{mode}-{k}", "prompt_id": f"q{i}", "mode": mode,
                     "sample_index": k, "prompt_token_ids": encode_text(tokenizer, prompt),
                     "response_token_ids": [*ids, tokenizer.eos_token_id],
                     "response_segments": [*segments, 4], "eos_emitted": True, "temperature": 0.8,
                     "top_p": 0.95}
                )  # fmt: skip
            best, worst = gens[-4], gens[-3]
            pairs[mode].append(
                {"pair_id": f"q{i}-{mode}", "prompt_id": f"q{i}",
                 "prompt_token_ids": best["prompt_token_ids"], "chosen_token_ids": best["response_token_ids"],
                 "rejected_token_ids": worst["response_token_ids"],
                 "chosen_generation_id": best["generation_id"],
                 "rejected_generation_id": worst["generation_id"]}
            )  # fmt: skip
    return gens, pairs


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_embedded_model_variance_table_is_stable_across_projection_seeds() -> None:
    """The default probe (LM head, D = 4096 Kronecker sketch) on SmolLM2-135M, on token-exact rows sampled at
    temperature 0.8 / top-p 0.95: finite values, effective sample sizes in [1, M], and an α̂* that does not
    hinge on the projection (two projection seeds agree within 0.1, same four prompts)."""
    from pipeline.model_assets import embedded_checkpoint
    from pipeline.training.grad_probe import build_probe
    from pipeline.training.modeling import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(embedded_checkpoint()), False)
    gens, pairs = _embedded_rows(tokenizer)
    rows = []
    for seed in (0, 1):
        config = TrainConfig(alpha=0.5, probe=ProbeConfig(seed=seed, bootstrap=200))
        probe = build_probe(model, tokenizer, pairs["trace"], gens, config)
        rows.append(probe.analyze(model, alpha=0.5))
    for row in rows:
        assert row["params"] == "head" and row["dim"] == 4096 and row["n_prompts"] == 4
        assert row["proposal"] == "recomputed" and row["traces_per_prompt"] == 4
        assert math.isfinite(row["alpha_hat"]) and 0.0 <= row["alpha_hat"] <= 1.0
        assert math.isfinite(row["trace_var_t"]) and row["denominator"] > 0
        assert all(1.0 - 1e-9 <= e <= 4.0 + 1e-9 for e in row["ess_posterior"])
        assert row["ci_low"] <= row["alpha_hat"] <= row["ci_high"]
    assert abs(rows[0]["alpha_hat"] - rows[1]["alpha_hat"]) < 0.1


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_embedded_model_alpha_auto_resumes_exactly_and_reports_alpha_hat_with_ess(tmp_path: Path) -> None:
    """``alpha: auto`` on SmolLM2-135M: the probe sets α at steps 0 and 2; a run stopped after step 1 and
    resumed reproduces α, the losses and the probe rows; the report's probe table shows α̂* with its interval
    and the minimum ESS."""
    from types import SimpleNamespace

    from pipeline.model_assets import embedded_checkpoint
    from pipeline.reporting.run_markdown import _probe_lines
    from pipeline.training.encoding import pair_tokens
    from pipeline.training.grad_probe import build_probe
    from pipeline.training.modeling import load_model_and_tokenizer
    from pipeline.training.sequences import pairs_batch
    from pipeline.training.trainer import RefPair

    config = _config(
        batch_size=2, max_steps=4, learning_rate=1e-4, warmup_steps=0, max_length=512,
        probe=ProbeConfig(every=2, bootstrap=100, ema_decay=0.5),
    )  # fmt: skip

    def trainer() -> BVPOTrainer:
        torch.manual_seed(0)
        model, tokenizer = load_model_and_tokenizer(str(embedded_checkpoint()), False)
        gens, pairs = _embedded_rows(tokenizer)
        data = {}
        for mode, rows in pairs.items():
            tokens = [pair_tokens(p) for p in rows]
            with torch.no_grad():
                logps = sequence_logps(model, pairs_batch(tokens, tokenizer.pad_token_id)).view(2, -1)
            data[mode] = [RefPair(t, float(c), float(r)) for t, c, r in zip(tokens, *logps, strict=True)]
        probe = build_probe(model, tokenizer, pairs["trace"], gens, config)
        return BVPOTrainer(model, data["trace"], data["empty"], config, tokenizer.pad_token_id, probe=probe)

    full = trainer()
    metrics = full.train()
    rows = full.probe.rows  # type: ignore[union-attr]
    assert [r["step"] for r in rows] == [0, 2]
    assert [m["alpha"] for m in metrics] == [rows[0]["alpha"]] * 2 + [rows[1]["alpha"]] * 2
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # π_θ = π_ref at the first step
    first = trainer()
    first.train(state_dir=tmp_path / "state", stop_after=1)
    first.save_state(tmp_path / "state")
    resumed = trainer()
    assert resumed.resume_from(tmp_path / "state") and resumed.step == 1
    resumed.train()
    assert [m["alpha"] for m in resumed.metrics] == [m["alpha"] for m in metrics]
    assert [m["loss"] for m in resumed.metrics] == pytest.approx([m["loss"] for m in metrics], abs=1e-6)
    assert [r["alpha_hat"] for r in resumed.probe.rows] == pytest.approx(  # type: ignore[union-attr]
        [r["alpha_hat"] for r in rows], abs=1e-9
    )
    text = "\n".join(
        _probe_lines(SimpleNamespace(grad_stats=SimpleNamespace(name="grad_stats__v1")), rows, None)
    )
    last = rows[-1]
    assert f"**α̂* = {last['alpha_hat']:.3f}** [{last['ci_low']:.3f}, {last['ci_high']:.3f}]" in text
    assert f"{last['ess_min']:.2f} [{last['low_ess_prompts']}]" in text
