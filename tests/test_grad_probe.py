"""The gradient probe (pipeline/training/grad_probe.py) on tiny models: exact gradients, α̂* against the α* of
docs/method.md §MSE-optimal α computed by enumerating every trace, the α² law of the trace-induced
variance, ``alpha: auto`` through the trainer, the Prefect flow and ``bvpo analyze-variance``.

Traces of one token make the marginal ``π(y|x) = Σ_r π(r|x) π(y|x,r)`` a sum over the vocabulary, so the true
marginal gradient G and the exact α* are computable and the estimates can be checked against them.
"""

from __future__ import annotations

import copy
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
from pipeline.training.alpha_star import estimate_gradient_stats, trace_variance
from pipeline.training.grad_probe import (
    GradProbe,
    ProbeDataError,
    ProbeExample,
    _HeadGradients,
    _ParamGradients,
    build_probe_examples,
    example_gradients,
)
from pipeline.training.loss import BVPOLoss, PreferenceLogps
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
    model = tiny_model(seed)
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
    ref = [exact.stats(model, e.sequences(), 0, False, with_grads=False) for e in examples]
    stats = [exact.stats(model, e.sequences(), 0, False, with_grads=True) for e in examples]

    def terms(per_example: list[Any]) -> torch.Tensor:
        parts = [example_gradients(s, r, 6, BETA) for s, r in zip(per_example, ref, strict=True)]
        g_t, g_e, g_hat = (torch.stack(p) for p in zip(*parts, strict=True))
        diff = g_e.unsqueeze(1) - g_t
        return torch.stack([((g_e.unsqueeze(1) - g_hat) * diff).sum(-1).mean(), diff.pow(2).sum(-1).mean()])

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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Enumerate every one-token trace r: exact G, g_e, and g_t(r⁺, r⁻) with π_ref(r⁺|x) π_ref(r⁻|x).

    G and g_e come from autograd of the losses; the V per-trace gradients from the closed-form head gradients
    (checked against autograd above). Returns G ``[D]``, g_e ``[D]``, g_t ``[V, V, D]``, π_ref(r|x) ``[V]``.
    """
    prompt, y_pos, y_neg = example.trace_prompt_ids, example.chosen_ids, example.rejected_ids
    all_r = [[r] for r in range(VOCAB)]

    def logps(model: torch.nn.Module, answer: list[int]) -> torch.Tensor:
        return _autograd_logps(model, [(prompt, r + answer) for r in all_r])  # log π(r, y | x), [V]

    with torch.no_grad():
        ref_pos, ref_neg = logps(reference, y_pos), logps(reference, y_neg)
        trace_probs = reference(input_ids=torch.tensor([prompt])).logits[0, -1].softmax(-1)
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
    return g_exact, g_e, g_t, trace_probs


def _snis_standard_error(probe: GradProbe, policy: torch.nn.Module, index: int) -> float:
    """Delta-method standard error of the self-normalized Ĝ of an example from all its M traces.

    For each answer, ``SE² = Σ_j w_j² ‖∇ log π(r_j, y) − Ĝ_y‖²``; Ĝ = c (Ĝ_{y⁺} − Ĝ_{y⁻}) adds them (× c²).
    """
    example, ref = probe.examples[index], probe.reference[index]
    m = len(example.trace_blocks)
    stats = _HeadGradients(policy, dim=10**9).stats(policy, example.sequences(), 0, False, with_grads=True)
    assert stats.grads is not None
    total, grads = stats.total[: 2 * m].view(m, 2), stats.grads[: 2 * m].view(m, 2, -1)
    log_w = total - (ref.total[: 2 * m : 2] - ref.answer[: 2 * m : 2]).unsqueeze(1)
    variance, log_ratio = 0.0, []
    for a in (0, 1):
        w = log_w[:, a].softmax(0)
        mean = w @ grads[:, a]
        variance += float((w.pow(2) * (grads[:, a] - mean).pow(2).sum(-1)).sum())
        log_ref = ref.answer[: 2 * m].view(m, 2)[:, a].logsumexp(0)
        log_ratio.append(float(log_w[:, a].logsumexp(0) - log_ref))
    c = BETA * torch.sigmoid(torch.tensor(-BETA * (log_ratio[0] - log_ratio[1])))
    return float(c) * math.sqrt(variance)


def test_probe_estimates_converge_to_the_exact_marginal_gradient_and_alpha_star() -> None:
    """Policy ≠ reference (the importance weights matter); traces sampled from π_ref, as stored traces are.

    Ĝ must lie within 3 delta-method standard errors of G (the SE is itself checked to be small), the
    sampled g_t must average to their exact mean, and α̂* must match the exact α* within 0.03.
    """
    policy, reference = _peaked(0, scale=10.0), _peaked(1, scale=10.0)
    with torch.no_grad():  # a policy some way from the reference
        for p, q in zip(policy.parameters(), reference.parameters(), strict=True):
            p.copy_(q + 0.3 * (p - q))
    examples = _examples(reference, 3, 200, seed=11)
    probe = GradProbe(reference, examples, _config(probe=ProbeConfig(traces=200)), pad_id=0)
    grads = probe.measure(policy)
    assert grads.g_t.shape == (3, 100, VOCAB * 16) and grads.g_hat.shape == grads.g_t.shape
    num, den = [], []
    for i, example in enumerate(examples):
        g_exact, g_e, g_t, probs = _exact_quantities(policy, reference, example)
        # Ĝ (self-normalized importance sampling; the mean of the leave-out estimates) → G.
        se = _snis_standard_error(probe, policy, i)
        assert float((grads.g_hat[i].mean(0) - g_exact).norm()) < 3 * se
        assert se < 0.2 * float(g_exact.norm())
        assert torch.allclose(grads.g_e[i], g_e, atol=1e-10)
        joint = probs.unsqueeze(1) * probs.unsqueeze(0)  # r⁺, r⁻ independent
        mean_t = (joint.unsqueeze(-1) * g_t).sum((0, 1))
        num.append(float((g_e - g_exact) @ (g_e - mean_t)))
        den.append(float((joint * (g_t - g_e).pow(2).sum(-1)).sum()))
        # The sampled g_t average to the exact E g_t (100 pairs: standard error ≈ 0.1 ‖E g_t‖ here).
        assert float((grads.g_t[i].mean(0) - mean_t).norm() / mean_t.norm()) < 0.25
    alpha_exact = min(1.0, max(0.0, sum(num) / sum(den)))
    stats = estimate_gradient_stats(grads.g_t, grads.g_e, grads.g_hat, bootstrap=100)
    assert 0.05 < alpha_exact < 0.95  # an interior optimum, so the check is not trivially at a bound
    assert stats.alpha_star == pytest.approx(alpha_exact, abs=0.03)
    assert stats.denominator == pytest.approx(sum(den) / 3, rel=0.05)


# -- the α² law of the trace-induced variance --------------------------------------------------------------


def _mixed_gradients(
    model: torch.nn.Module, probe: GradProbe, example_index: int, alpha: float
) -> torch.Tensor:
    """g_c of each trace pair of an example, through the training loss: ∇ BVPOLoss(α) on one pair per mode."""
    example = probe.examples[example_index]
    ref = probe.reference[example_index]
    m = len(example.trace_blocks)
    loss_fn = BVPOLoss(BETA)
    out = []
    for k in range(m // 2):
        c, r = 2 * k, 2 * k + 1
        seqs = [
            (example.trace_prompt_ids, example.trace_blocks[c] + example.chosen_ids),
            (example.trace_prompt_ids, example.trace_blocks[r] + example.rejected_ids),
            (example.empty_prompt_ids, example.empty_block + example.chosen_ids),
            (example.empty_prompt_ids, example.empty_block + example.rejected_ids),
        ]
        lp = _autograd_logps(model, seqs)
        trace = PreferenceLogps(
            lp[0:1], lp[1:2], ref.total[2 * c : 2 * c + 1], ref.total[2 * r + 1 : 2 * r + 2]
        )
        empty = PreferenceLogps(lp[2:3], lp[3:4], ref.total[2 * m : 2 * m + 1], ref.total[2 * m + 1 :])
        out.append(_grad(loss_fn(trace, empty, alpha).loss, model))
    return torch.stack(out)


def test_mixed_gradient_trace_variance_is_alpha_squared_times_that_of_g_t() -> None:
    """Var_r[g_c] = α² Var_r[g_t] (docs/method.md §The variance law), measured on a model through BVPO.

    (1) Same traces: g_c from autograd of L_BVPO equals α g_t + (1−α) g_e, so the variances agree to float
    precision. (2) Independent trace draws for g_t and g_c: H0 ``tr Var[g_c] = α² tr Var[g_t]`` is tested on
    ``log(V_c / (α² V_t))`` with a standard error from a bootstrap over trace pairs (resampled within each
    prompt, both draws independently, 400 resamples); we accept when |z| < 3 (two-sided, ≈ 0.3% level), and
    call V_c strictly below V_t when ``log(V_c/V_t) + 3·SE < 0``.
    """
    policy = _peaked(0)
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    draws = []
    for seed in (21, 22):
        examples = _examples(reference, 3, 160, seed=seed, length=2)
        if draws:  # same prompts and answers, independent traces
            gen = torch.Generator().manual_seed(99)
            examples = [
                ProbeExample(
                    e.prompt_id,
                    e.trace_prompt_ids,
                    _sample_traces(reference, e.trace_prompt_ids, 160, 2, gen),
                    e.empty_prompt_ids,
                    e.empty_block,
                    e.chosen_ids,
                    e.rejected_ids,
                )
                for e in draws[0].examples
            ]
        draws.append(GradProbe(reference, examples, _config(probe=ProbeConfig(traces=160)), pad_id=0))
    grads_a = draws[0].measure(policy)
    v_t = trace_variance(grads_a.g_t)
    rng = torch.Generator().manual_seed(0)

    def boot_var(samples: torch.Tensor) -> torch.Tensor:
        n, k, _ = samples.shape
        idx = torch.randint(0, k, (400, n, k), generator=rng)
        return torch.tensor([trace_variance(samples[torch.arange(n).unsqueeze(1), i]) for i in idx])

    boot_t = boot_var(grads_a.g_t)
    # (1) same traces: exact.
    same = torch.stack([_mixed_gradients(policy, draws[0], i, 0.3) for i in range(3)])
    mixed = 0.3 * grads_a.g_t + 0.7 * grads_a.g_e.unsqueeze(1)
    assert torch.allclose(same, mixed, atol=1e-9)
    assert trace_variance(same) == pytest.approx(0.09 * v_t, rel=1e-8)
    for alpha in (0.3, 0.7):
        # (2) independent traces: within sampling error of α² V_t, and strictly below V_t.
        independent = torch.stack([_mixed_gradients(policy, draws[1], i, alpha) for i in range(3)])
        v_c = trace_variance(independent)
        boot_c = boot_var(independent)
        log_ratio = math.log(v_c / (alpha**2 * v_t))
        se = float((boot_c.log() - boot_t.log()).std())
        assert abs(log_ratio) < 3 * se, (alpha, log_ratio, se)
        assert math.log(v_c / v_t) + 3 * se < 0
        assert 0.02 < se < 0.5  # the test has power: the tolerance is not vacuous


# -- the probe set from stored rows -----------------------------------------------------------------------


class _CharTokenizer:
    eos_token_id = 1
    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [2 + ord(c) % 60 for c in text]}


def _gen(pid: str, mode: str, i: int, trace: str | None, answer: str, prompt: str = "Q?") -> dict[str, Any]:
    block = f"<think>\n{trace}\n</think>\n\n" if mode == "trace" else "<think>\n\n</think>\n\n"
    return {
        "prompt_id": pid,
        "mode": mode,
        "sample_index": i,
        "prompt_text": f"{prompt}[{mode}]",
        "response_text": block + answer,
        "answer": answer,
    }


def _pair(pid: str) -> dict[str, Any]:
    return {
        "pair_id": f"{pid}-trace",
        "prompt_id": pid,
        "prompt_text": "Q?[trace]",
        "chosen_answer": "yes",
        "rejected_answer": "no",
    }


def test_probe_examples_reuse_stored_traces_of_qualifying_prompts() -> None:
    gens = []
    for pid, n_traces in (("a", 4), ("b", 3), ("c", 4), ("d", 5)):
        gens += [_gen(pid, "trace", i, f"{pid} thinks {i}", f"ans{i}") for i in range(n_traces)]
        if pid != "c":  # c has no reasoning-off generation
            gens.append(_gen(pid, "empty", 0, None, "plain"))
    gens[-3]["response_text"] = "mangled"  # d's sample 3 does not split into block + answer
    pairs = [_pair(p) for p in "abcd"]
    tok = _CharTokenizer()
    examples = build_probe_examples(tok, pairs, gens, ProbeConfig(prompts=4, traces=4), max_length=512)
    assert sorted(e.prompt_id for e in examples) == ["a", "d"]
    d = next(e for e in examples if e.prompt_id == "d")
    blocks = [f"<think>\nd thinks {i}\n</think>\n\n" for i in (0, 1, 2, 4)]
    assert d.trace_blocks == [tok(b)["input_ids"] for b in blocks]
    assert d.empty_block == tok("<think>\n\n</think>\n\n")["input_ids"]
    assert d.chosen_ids == tok("yes")["input_ids"] + [1] and d.rejected_ids == tok("no")["input_ids"] + [1]
    assert d.trace_prompt_ids == tok("Q?[trace]")["input_ids"]
    assert d.empty_prompt_ids == tok("Q?[empty]")["input_ids"]
    # One prompt: which one depends on the seed only.
    picks = {
        build_probe_examples(tok, pairs, gens, ProbeConfig(prompts=1, seed=s), 512)[0].prompt_id
        for s in range(8)
    }
    assert picks == {"a", "d"}
    # Traces that do not fit max_length are not used.
    with pytest.raises(ProbeDataError, match="stored reasoning-on traces"):
        build_probe_examples(tok, pairs, gens, ProbeConfig(traces=4), max_length=30)
    with pytest.raises(ProbeDataError, match="samples_per_prompt"):
        build_probe_examples(tok, pairs, gens, ProbeConfig(traces=6), max_length=512)


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
        assert row["trace_var_c"] == pytest.approx(row["alpha"] ** 2 * row["trace_var_t"], rel=1e-9)
        assert row["trace_var_c"] < row["trace_var_t"]
        assert row["ci_low"] <= row["alpha_hat"] <= row["ci_high"]
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
                )
            )
    parents = [refs["generations"], refs["scores"]]
    refs["pairs_trace"] = put("pairs_trace", pairs["trace"], parents)
    refs["pairs_empty"] = put("pairs_empty", pairs["empty"], parents)
    ref_rows = compute_reference_logps(str(model_dir), pairs, model_label="tiny", max_length=256, bf16=False)
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
    assert row["trace_var_c"] == pytest.approx(0.25 * row["trace_var_t"], rel=1e-9)
    table = runner.invoke(app, [*base, "--set", "train.probe.prompts=2"])
    assert table.exit_code == 0, table.output
    assert "α̂*" in table.stdout and "tr Var_r[g_c]" in table.stdout and "2 prompts" in table.stdout
    bad = runner.invoke(app, [*base, "--pairs", "pairs_empty"])
    assert bad.exit_code == 1 and "not pairs_trace" in bad.output
    shown = runner.invoke(app, ["analyze-variance", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert "tr Var_r(g_c)" in shown.output  # nothing eaten by rich markup
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


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_embedded_model_variance_table_is_stable_across_projection_seeds() -> None:
    """The default probe (LM head, D = 4096 Kronecker sketch) on SmolLM2-135M: finite values, the α² law, and
    an α̂* that does not hinge on the projection (two projection seeds agree within 0.1, same four prompts)."""
    from pipeline.model_assets import embedded_checkpoint
    from pipeline.training.grad_probe import build_probe
    from pipeline.training.modeling import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(embedded_checkpoint()), False)
    rng = random.Random(0)
    questions = ["What is 7 + 5?", "Name a primary color.", "What is 9 times 3?", "Greet me in lowercase."]
    gens, pairs = [], []
    for i, question in enumerate(questions):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        for mode in ("trace", "empty"):
            for k in range(4):
                steps = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 30)))
                block = f"<think>\n{steps}\n</think>\n\n" if mode == "trace" else "<think>\n\n</think>\n\n"
                answer = f"The answer is {rng.randint(0, 30)}."
                gens.append(
                    _gen(f"q{i}", mode, k, None, answer)
                    | {"prompt_text": prompt, "response_text": block + answer}
                )
        pairs.append(
            _pair(f"q{i}") | {"prompt_text": prompt, "chosen_answer": "It is 12.", "rejected_answer": "No."}
        )
    rows = []
    for seed in (0, 1):
        config = TrainConfig(alpha=0.5, probe=ProbeConfig(seed=seed, bootstrap=200))
        probe = build_probe(model, tokenizer, pairs, gens, config)
        rows.append(probe.analyze(model, alpha=0.5))
    for row in rows:
        assert row["params"] == "head" and row["dim"] == 4096 and row["n_prompts"] == 4
        assert math.isfinite(row["alpha_hat"]) and 0.0 <= row["alpha_hat"] <= 1.0
        assert row["trace_var_t"] > 0 and row["trace_var_c"] == pytest.approx(
            0.25 * row["trace_var_t"], rel=1e-9
        )
        assert row["ci_low"] <= row["alpha_hat"] <= row["ci_high"]
    assert abs(rows[0]["alpha_hat"] - rows[1]["alpha_hat"]) < 0.1
