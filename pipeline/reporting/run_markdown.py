"""The run report's Markdown: setup, data, pairs per mode, training, the gradient probe and evaluation.

Pure formatting of what :mod:`pipeline.reporting.run_stats` aggregated and the configs the catalog recorded
with each dataset; α and the trace-induced variance are explained as in docs/method.md §The BVPO mixture and
§The variance law.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.reporting.run_stats import RunStats
from storage import DatasetStore
from storage.runs import RunDatasets


def run_markdown(
    store: DatasetStore,
    run: RunDatasets,
    stats: RunStats,
    metrics: list[dict[str, Any]],
    evals: list[dict[str, Any]],
    curves: Path | None,
    chart: Path | None,
    title: str | None,
    probe: tuple[list[dict[str, Any]], Path | None] = ([], None),
) -> str:
    from pipeline.evaluation.report import comparison_markdown, power_lines

    setup = _setup(run)
    runs = sorted({e.flow_run_id for e in run.lineage if e.flow_run_id})
    times = sorted(e.created_at for e in run.lineage if e.created_at is not None)
    lines = [f"# BVPO run report: {title or run.anchor.name}", ""]
    headline = _headline(setup, metrics, evals)
    if headline:
        lines += [headline, ""]
    lines.append(f"Workspace `{store.workspace}`; report of `{run.anchor.name}` and its lineage.")
    if runs:
        lines.append("Prefect flow runs: " + ", ".join(f"`{r}`" for r in runs) + ".")
    if times:
        lines.append(f"Datasets registered {times[0]:%Y-%m-%d %H:%M} to {times[-1]:%Y-%m-%d %H:%M} UTC.")
    lines += ["", "## Setup", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in setup.items()]

    lines += ["", "## Data", "", "| dataset | rows | version | flow run |", "|---|---|---|---|"]
    extra = [run.grad_stats] if run.grad_stats is not None else []
    for e in sorted(run.lineage + run.rejects + extra, key=lambda e: (_kind_rank(e.kind), e.number)):
        lines.append(f"| `{e.name}` | {e.row_count} | `{e.version}` | `{(e.flow_run_id or '-')[:8]}` |")
    prompts = stats.prompts()
    if prompts:
        lines += [
            "",
            "Prompts by split and task type:",
            "",
            "| split | task type | prompts |",
            "|---|---|---|",
        ]
        lines += [f"| {r['split']} | {r['task_type']} | {r['prompts']} |" for r in prompts]
    gens = stats.generations()
    if gens:
        lines += [
            "",
            "Generations per reasoning mode (*trace*: reasoning on; *empty*: reasoning off):",
            "",
            "| mode | rows | prompts | parse failures | mean trace tokens | mean answer tokens | "
            "traces closed by the budget | answers cut at max tokens |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['mode']} | {r['rows']} | {r['prompts']} | {r['parse_failures']} | "
            f"{_num(r['trace_tokens'], 1)} | {_num(r['answer_tokens'], 1)} | {_pct(r['budget_closed'])} | "
            f"{_pct(r['answer_cut'])} |"
            for r in gens
        ]
    scores = stats.scores()
    if scores:
        lines += ["", "Scores of the final answers:", "", "| mode | answers | mean score | score 1 |"]
        lines += ["|---|---|---|---|"]
        lines += [
            f"| {r['mode']} | {r['answers']} | {_num(r['mean_score'])} | {_pct(r['full_score'])} |"
            for r in scores
        ]
    rejects = stats.rejects()
    if rejects:
        lines += ["", "Rejected rows (with their reason):", "", "| stage | reason | rows |", "|---|---|---|"]
        lines += [f"| {r['stage']} | {_cell(r['reason'])} | {r['n']} |" for r in rejects]

    pairs = stats.pairs()
    if pairs:
        train_prompts = sum(r["prompts"] for r in prompts if r["split"] == "train") if prompts else None
        lines += [
            "",
            "## Pairs per mode",
            "",
            "Best vs worst answer per prompt and mode; D_t trains L_t, D_e trains L_e.",
            "",
            "| dataset | mode | pairs | of train prompts | mean margin | mean chosen score "
            "| mean rejected score |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in pairs:
            label = "D_t" if r["mode"] == "trace" else "D_e"
            share = f"{r['pairs'] / train_prompts:.0%}" if train_prompts else "-"
            lines.append(
                f"| {label} `{r['name']}` | {r['mode']} | {r['pairs']} | {share} | {_num(r['margin'])} | "
                f"{_num(r['chosen'])} | {_num(r['rejected'])} |"
            )

    lines += _agreement_lines(stats.agreement())
    lines += ["", "## Training", ""]
    lines += _training_lines(run, metrics, curves)
    lines += _probe_lines(run, *probe)
    lines += ["", "## Evaluation", ""]
    if evals:
        n = max((r["n"] for r in evals if r["metric"] == "score"), default=0)
        lines += [
            comparison_markdown(evals),
            "",
            f"Mean per-prompt value on {n} held-out prompts per mode, with 95% percentile-bootstrap "
            "intervals over prompts; win rates are against the reference model (ties count half).",
            *[line for sentence in power_lines(evals) for line in ("", sentence)],
        ]
        if chart is not None:
            lines += ["", f"![Evaluation scores with 95% intervals]({chart.name})"]
    else:
        lines.append("No evaluation in this run.")
    lines += ["", "## Reproduce", "", "```bash"]
    ws = store.workspace
    lines.append(f"bvpo lineage {run.anchor.name} -w {ws}       # every dataset and its config")
    lines.append(f"bvpo report {run.anchor.name} -w {ws}        # this report")
    lines += ["```", ""]
    return "\n".join(lines)


def _agreement_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Sampler/trainer log-prob agreement per mode and segment (docs/method.md §Token-exact sequences)."""
    if not rows:
        return []
    lines = [
        "",
        "## Sampler/trainer agreement",
        "",
        "Per sampled token of the pairs' generations: the reference pass's log-prob minus the engine's raw "
        "log-prob of the same token (same model, before training), in nats. Large values mean the trainer "
        "does not score what the sampler produced (template, tokenizer, dtype or kernels differ).",
        "",
        "| mode | segment | tokens | mean abs | mean | p99 abs | max abs | engine dtype |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['mode']} | {r['segment']} | {r['tokens']} | {_num(r['mean_abs_delta'], 4)} | "
        f"{_num(r['mean_delta'], 4)} | {_num(r['p99_abs_delta'], 4)} | {_num(r['max_abs_delta'], 4)} | "
        f"{r.get('sampler_dtype') or '-'} |"
        for r in sorted(rows, key=lambda r: (r["mode"], r["segment"] == "all", r["segment"]))
    ]
    return lines


def _training_lines(run: RunDatasets, metrics: list[dict[str, Any]], curves: Path | None) -> list[str]:
    train = run.one("train_metrics")
    if train is None or not metrics:
        return ["No training in this run (a checkpoint from elsewhere, or data only)."]
    alphas = [float(m["alpha"]) for m in metrics]
    cfg = train.config.get("train", {})
    lines = [_alpha_line(alphas, cfg.get("alpha")), ""]
    lines += [
        "| | first step | last step |",
        "|---|---|---|",
    ]
    first, last = metrics[0], metrics[-1]
    for key, label in (
        ("loss", "L_BVPO"),
        ("loss_t", "L_t (trace)"),
        ("loss_e", "L_e (empty)"),
        ("reward_acc_t", "implicit-reward accuracy, trace"),
        ("reward_acc_e", "implicit-reward accuracy, empty"),
        ("reward_margin_t", "implicit-reward margin, trace"),
        ("reward_margin_e", "implicit-reward margin, empty"),
        ("grad_norm", "gradient norm"),
    ):
        if first.get(key) is not None or last.get(key) is not None:
            lines.append(f"| {label} | {_num(first.get(key), 4)} | {_num(last.get(key), 4)} |")
    seconds = [m["seconds"] for m in metrics if m.get("seconds") is not None]
    speeds = [m["tokens_per_s"] for m in metrics if m.get("tokens_per_s")]
    lines += [
        "",
        f"{len(metrics)} steps"
        + (f" in {sum(seconds):.0f} s" if seconds else "")
        + (f" ({sum(speeds) / len(speeds):.0f} tokens/s on average)" if speeds else "")
        + f"; metrics `{train.name}`, checkpoint `{metrics[-1].get('checkpoint', '-')}`.",
    ]
    lines += _budget_lines(metrics, cfg.get("budget"))
    others = run.by_kind.get("train_metrics", [])[1:]
    if others:
        lines.append("Also trained for the comparison: " + ", ".join(f"`{e.name}`" for e in others) + ".")
    if curves is not None:
        lines += ["", f"![BVPO training curves]({curves.name})"]
    return lines


def _budget_lines(metrics: list[dict[str, Any]], budget: str | None) -> list[str]:
    """Pairs and tokens per optimizer step per mode (``docs/method.md`` §Matched budgets)."""
    if not any(m.get("pairs_t") is not None for m in metrics):
        return []  # trained before train_metrics recorded them

    def mean(key: str) -> float:
        return sum(float(m.get(key) or 0) for m in metrics) / len(metrics)

    matched = {
        "matched": "matched: α = 1 and α = 0 draw 2·batch_size pairs of their one mode, so every α of a "
        "comparison sees the same pairs per step",
        "per_mode": "per_mode: batch_size pairs of each mode in use, so BVPO sees twice a baseline's pairs",
    }
    return [
        "",
        f"Per optimizer step: {mean('pairs_t'):.0f} D_t + {mean('pairs_e'):.0f} D_e pairs, "
        f"{mean('tokens_t'):.0f} + {mean('tokens_e'):.0f} tokens on average (train.budget "
        f"{matched.get(budget or '', budget or '-')}).",
    ]


def _probe_lines(run: RunDatasets, rows: list[dict[str, Any]], figure: Path | None) -> list[str]:
    """The gradient probe: α̂* with its interval per probe, the effective sample sizes of its importance
    weights, the measured trace-induced variance of g_t and the estimated MSE(α) (docs/method.md §Probe
    estimator)."""
    if not rows or run.grad_stats is None:
        return []
    rows = sorted(rows, key=lambda r: r["step"])
    last = rows[-1]
    lines = [
        "",
        f"### α̂* and the trace-induced variance (gradient probe, `{run.grad_stats.name}`)",
        "",
        f"At the last probe (step {last['step']}) the MSE-optimal mixing weight was estimated at "
        f"**α̂* = {last['alpha_hat']:.3f}** [{last['ci_low']:.3f}, {last['ci_high']:.3f}] (95% bootstrap over "
        f"{last['n_prompts']} prompts, {last['dim']} gradient dimensions of `{last['params']}`); training "
        f"used α = {last['alpha']:.3g}.",
        "",
        "g_t is the trainer's: each answer after traces drawn from the sampler's posterior given that answer "
        "(importance weights over the stored traces). Min ESS: the smallest effective number of traces "
        "behind a prompt's weights (in brackets: prompts below `train.probe.min_ess`, whose α̂* terms "
        "rest on one or two traces). tr Var_r[g_t] is measured; the mixture's is α² times it by the "
        "variance law (docs/method.md §The variance law), not measured here.",
        "",
        "| step | α used | α̂* [95% interval] | min ESS [low] | tr Var_r[g_t] | MSE(1) | MSE(0) | MSE(α) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ess = "-" if r.get("ess_min") is None else f"{r['ess_min']:.2f} [{r.get('low_ess_prompts', 0)}]"
        lines.append(
            f"| {r['step']} | {r['alpha']:.3g} | "
            f"{r['alpha_hat']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {ess} | "
            f"{_sci(r.get('trace_var_t'))} | {_sci(r['mse_trace'])} | "
            f"{_sci(r['mse_empty'])} | {_sci(r['mse_alpha'])} |"
        )
    if last.get("mse_grid"):
        curve = ", ".join(
            f"{a:.1f}: {m:.3g} [{lo:.3g}, {hi:.3g}]"
            for a, m, lo, hi in zip(
                last["alpha_grid"], last["mse_grid"], last["mse_grid_low"], last["mse_grid_high"], strict=True
            )
            if round(a * 10) % 2 == 0
        )
        lines += ["", f"Estimated MSE(α) at the last probe (95% bootstrap intervals): {curve}."]
    if figure is not None:
        lines += ["", f"![α̂* over training and the trace-induced variance]({figure.name})"]
    return lines


def _sci(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3g}"


def _alpha_line(alphas: Sequence[float], configured: Any) -> str:
    """α as used, what it means, and the trace-induced variance it keeps (α² of DPO on traces)."""
    alpha = alphas[-1]
    meaning = _alpha_meaning(alpha, configured)
    text = (
        f"**α = {alpha:g}**: L_BVPO = {alpha:g}·L_t + {1 - alpha:g}·L_e ({meaning}). "
        f"The trace-induced gradient variance is α² = {alpha * alpha:.3g} of DPO on traces."
    )
    if min(alphas) != max(alphas):
        text += f" α moved during training: {alphas[0]:.3g} at the first step, {min(alphas):.3g} to "
        text += f"{max(alphas):.3g} over the run, {alpha:.3g} at the last step."
    return text


def _alpha_meaning(alpha: float, configured: Any) -> str:
    if configured == "auto":
        return "α = auto: the probe's smoothed estimate of the MSE-optimal α*"
    if alpha == 1:
        return "the DPO-on-traces baseline"
    if alpha == 0:
        return "the DPO-on-empty-traces baseline"
    return "BVPO mixture"


def _setup(run: RunDatasets) -> dict[str, str]:
    """The settings a reader needs, from the configs the catalog recorded with each dataset."""
    out: dict[str, str] = {}
    gen_entry, train_entry = run.one("generations"), run.one("train_metrics")
    source = gen_entry or train_entry
    model = source.config.get("model") if source is not None else None
    if model:
        out["model"] = f"`{model}`"
    if (p := run.one("prompts")) is not None:
        c = p.config
        out["prompts"] = (
            f"`{c.get('source')}`, {p.row_count} kept of {c.get('num_prompts')} asked, "
            f"{_num(c.get('eval_fraction'), 2)} held out for evaluation"
        )
    if gen_entry is not None:
        g = gen_entry.config.get("generation", {})
        reasoning = g.get("reasoning", {})
        out["generation"] = (
            f"{g.get('samples_per_prompt')} samples per prompt and mode, temperature {g.get('temperature')}, "
            f"top-p {g.get('top_p')}, trace budget {g.get('max_trace_tokens')} tokens, answers up to "
            f"{g.get('max_answer_tokens')} tokens, reasoning control `{reasoning.get('control')}`"
        )
    if (s := run.one("scores")) is not None:
        scorers = s.config.get("scorers", [])
        out["scoring"] = ", ".join(
            f"{x.get('label') or x.get('name')} (weight {x.get('weight')})" if isinstance(x, dict) else str(x)
            for x in scorers
        )
    if (pt := run.one("pairs_trace")) is not None and pt.config.get("imported_from"):
        sources = ", ".join(f"`{s}`" for s in pt.config["imported_from"])
        out["pairing"] = f"imported from {sources}: these pairs were not sampled, scored or paired here"
    elif pt is not None:
        c = pt.config
        ratio = c.get("max_length_ratio")
        out["pairing"] = f"min margin {c.get('min_margin')}" + (
            f", max length ratio {ratio}" if ratio is not None else ""
        )
    if train_entry is not None:
        t = train_entry.config.get("train", {})
        lora = t.get("lora")
        procs = t.get("num_processes", 1)
        out["training"] = (
            f"α = {t.get('alpha')}, β = {t.get('beta')}, {t.get('max_steps')} steps, "
            f"batch {t.get('batch_size')} pairs per mode × {t.get('grad_accum_steps', 1)} accumulation, "
            f"lr {t.get('learning_rate')}, "
            + (f"LoRA r={lora.get('r')}" if isinstance(lora, dict) else "all weights")
            + (f", {procs} processes ({t.get('distributed')})" if procs and procs > 1 else "")
        )
    if (ev := run.one("eval_results")) is not None:
        c = ev.config
        out["evaluation"] = (
            f"{c.get('samples_per_prompt')} sample(s) per prompt, temperature {c.get('temperature')}, "
            f"{c.get('bootstrap_samples')} bootstrap resamples"
        )
    return out


def _headline(setup: dict[str, str], metrics: list[dict[str, Any]], evals: list[dict[str, Any]]) -> str:
    parts = []
    if metrics:
        first, last = metrics[0], metrics[-1]
        parts.append(
            f"BVPO with α = {last['alpha']:g}: loss {first['loss']:.4f} → {last['loss']:.4f} "
            f"in {len(metrics)} steps"
        )
    scores = {(r["model_label"], r["mode"]): r["value"] for r in evals if r["metric"] == "score"}
    for mode in ("trace", "empty"):
        ref, trained = scores.get(("reference", mode)), scores.get(("trained", mode))
        if ref is not None and trained is not None:
            parts.append(f"{mode} score {ref:.3f} → {trained:.3f}")
    return ("**" + "; ".join(parts) + ".**") if parts else ""


def _kind_rank(kind: str) -> int:
    order = [
        "prompts", "generations", "scores", "rejects", "pairs_trace", "pairs_empty", "ref_logps",
        "grad_stats", "train_metrics", "eval_generations", "eval_results",
    ]  # fmt: skip
    return order.index(kind) if kind in order else len(order)


def _num(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{float(value):.0%}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
