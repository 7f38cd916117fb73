"""One report per pipeline run: a Markdown file and PNG figures, built from the catalog alone.

A *run* is found through the catalog: every dataset records the Prefect flow run that registered it
(``flow_run_id``) and its parents, so from one dataset of the run (its ``eval_results``, or the most
downstream dataset a flow run registered) the lineage gives every other one, reused datasets included.
Nothing here talks to Prefect; :mod:`flows.cli` maps flow run names to ids first.

The report reuses :func:`pipeline.training.plots.plot_training_curves` and
:mod:`pipeline.evaluation.report` for its figures and evaluation table.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from storage import DatasetRef, DatasetStore, run_readonly_query

# Most downstream first: the dataset a run is anchored on when a flow run registered several.
ANCHOR_ORDER = (
    "eval_results",
    "train_metrics",
    "ref_logps",
    "pairs_trace",
    "pairs_empty",
    "scores",
    "generations",
    "prompts",
    "eval_generations",
)
_UUID_PREFIX = re.compile(r"^[0-9a-fA-F-]{6,36}$")
REPORT_NAME = "report.md"
REPORT_STEPS = (
    "reading the datasets",
    "plotting the training curves",
    "plotting the evaluation",
    "writing the Markdown",
)
"""What :func:`write_run_report` reports through ``on_step``, in order."""


class RunNotFound(LookupError):
    """Nothing in the catalog matches the run asked for."""


@dataclass(frozen=True)
class Entry:
    """One row of the catalog's ``datasets`` table."""

    name: str
    kind: str
    version: str
    number: int
    path: str
    row_count: int
    config: dict[str, Any]
    parents: tuple[str, ...]
    flow_run_id: str | None
    created_at: datetime | None

    @property
    def qualified(self) -> str:
        return f"{self.kind}:{self.version}"

    @property
    def ref(self) -> DatasetRef:
        return DatasetRef(
            kind=self.kind, version=self.version, number=self.number, path=self.path, row_count=self.row_count
        )


class CatalogView:
    """The ``datasets`` table read once, with lineage helpers (no connection is kept open)."""

    def __init__(self, store: DatasetStore) -> None:
        self.store = store
        rows = store.catalog.snapshot().to_pylist()
        self.entries = [
            Entry(
                name=r["name"],
                kind=r["kind"],
                version=r["version"],
                number=int(r["number"]),
                path=r["path"],
                row_count=int(r["row_count"]),
                config=json.loads(r["config"]) if isinstance(r["config"], str) else dict(r["config"] or {}),
                parents=tuple(r["parents"] or ()),
                flow_run_id=r["flow_run_id"],
                created_at=r["created_at"],
            )
            for r in rows
            if r["status"] == "complete"
        ]
        self._by_qualified = {e.qualified: e for e in self.entries}

    def get(self, qualified: str) -> Entry | None:
        return self._by_qualified.get(qualified)

    def find(self, name: str) -> Entry | None:
        """A dataset by ``kind__v<N>``, ``kind:<version>``, ``<version>`` or ``kind`` (its latest version)."""
        if ":" in name:
            return self.get(name)
        if any(e.kind == name for e in self.entries):
            return self.latest(name)
        return next((e for e in self.entries if name in (e.name, e.version)), None)

    def latest(self, kind: str) -> Entry | None:
        found = [e for e in self.entries if e.kind == kind]
        return max(found, key=lambda e: (e.created_at or datetime.min, e.number)) if found else None

    def ancestors(self, entry: Entry) -> list[Entry]:
        """``entry`` and every dataset it was derived from, each once, nearest first."""
        out, seen, queue = [], set(), [entry]
        while queue:
            node = queue.pop(0)
            if node.qualified in seen:
                continue
            seen.add(node.qualified)
            out.append(node)
            queue += [p for p in (self.get(q) for q in node.parents) if p is not None]
        return out

    def children(self, entry: Entry, kind: str) -> list[Entry]:
        return [e for e in self.entries if e.kind == kind and entry.qualified in e.parents]

    def run_ids(self, prefix: str) -> list[str]:
        """Flow run ids in the catalog equal to, or starting with, ``prefix``."""
        ids = sorted({e.flow_run_id for e in self.entries if e.flow_run_id})
        exact = [i for i in ids if i == prefix]
        return exact or ([i for i in ids if i.startswith(prefix)] if _UUID_PREFIX.match(prefix) else [])

    def anchor_of_runs(self, run_ids: Sequence[str]) -> Entry | None:
        """The most downstream dataset the flow runs registered, extended from training to its evaluation."""
        registered = [e for e in self.entries if e.flow_run_id in set(run_ids)]
        for kind in ANCHOR_ORDER:
            found = [e for e in registered if e.kind == kind]
            if found:
                return self.downstream(max(found, key=lambda e: (e.created_at or datetime.min, e.number)))
        return None

    def downstream(self, entry: Entry) -> Entry:
        """A ``train_metrics`` dataset's latest evaluation (``eval_results``), else the entry itself."""
        if entry.kind != "train_metrics":
            return entry
        results = [
            r for g in self.children(entry, "eval_generations") for r in self.children(g, "eval_results")
        ]
        return max(results, key=lambda e: (e.created_at or datetime.min, e.number)) if results else entry


def resolve_run(view: CatalogView, run: str) -> Entry:
    """The anchor dataset of ``run``: ``latest``, a dataset name, or a flow run id (or unique prefix)."""
    if run == "latest":
        for kind in ("eval_results", "train_metrics", *ANCHOR_ORDER):
            entry = view.latest(kind)
            if entry is not None:
                return view.downstream(entry)
        raise RunNotFound(f"the catalog {view.store.catalog.path} holds no dataset yet: run `bvpo run` first")
    entry = view.find(run)
    if entry is not None:
        return view.downstream(entry)
    ids = view.run_ids(run)
    if len(ids) > 1:
        raise RunNotFound(
            f"'{run}' matches {len(ids)} flow runs ({', '.join(ids[:3])}, ...): give more of the id"
        )
    anchor = view.anchor_of_runs(ids) if ids else None
    if anchor is None:
        raise RunNotFound(f"no dataset in {view.store.catalog.path} was registered by a flow run '{run}'")
    return anchor


@dataclass
class RunReport:
    """What :func:`write_run_report` wrote."""

    markdown: Path
    figures: list[Path]
    anchor: str
    datasets: list[str] = field(default_factory=list)


@dataclass
class _Run:
    """The datasets of one run, by kind."""

    anchor: Entry
    lineage: list[Entry]
    by_kind: dict[str, list[Entry]]
    rejects: list[Entry]
    grad_stats: Entry | None = None

    def one(self, kind: str) -> Entry | None:
        found = self.by_kind.get(kind, [])
        return found[0] if found else None


def _collect(view: CatalogView, anchor: Entry) -> _Run:
    lineage = view.ancestors(anchor)
    by_kind: dict[str, list[Entry]] = {}
    for entry in lineage:
        by_kind.setdefault(entry.kind, []).append(entry)
    # Rejects are siblings, not ancestors: those registered with the same inputs as one of the run's datasets.
    rejects = []
    for r in view.entries:
        if r.kind != "rejects":
            continue
        target = dict(r.config)
        kind = target.pop("for", None)
        if any(e.kind == kind and e.parents == r.parents and e.config == target for e in lineage):
            rejects.append(r)
    trained = [
        e for e in by_kind.get("eval_generations", []) if e.config.get("label") == "trained" and e.parents
    ]
    if trained and "train_metrics" in by_kind:  # the main checkpoint first (baselines may follow)
        main = {p for e in trained for p in e.parents}
        by_kind["train_metrics"].sort(key=lambda e: e.qualified not in main)
    run = _Run(anchor, lineage, by_kind, rejects)
    train = run.one("train_metrics")
    if train is not None:  # the gradient probe's rows: registered with the same inputs as the training
        probes = [
            e
            for e in view.entries
            if e.kind == "grad_stats" and e.parents == train.parents and e.config == train.config
        ]
        run.grad_stats = probes[-1] if probes else None
    return run


def write_run_report(
    store: DatasetStore,
    anchor: Entry,
    out_dir: Path,
    *,
    title: str | None = None,
    view: CatalogView | None = None,
    on_step: Callable[[str], None] | None = None,
) -> RunReport:
    """Write ``report.md`` and its PNG figures for the run ``anchor`` belongs to into ``out_dir``."""
    step = on_step or (lambda _: None)
    view = view or CatalogView(store)
    run = _collect(view, anchor)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: list[Path] = []
    step("reading the datasets")
    stats = _Stats(store, run)
    metrics = stats.rows(run.one("train_metrics"))
    evals = stats.rows(run.one("eval_results"))
    step("plotting the training curves")
    curves = None
    if metrics:
        from pipeline.training.plots import plot_training_curves

        curves = plot_training_curves(metrics, out_dir / "training-curves.png")
        figures.append(curves)
    step("plotting the evaluation")
    chart = None
    if any(r["metric"] == "score" for r in evals):
        from pipeline.evaluation.report import comparison_chart

        chart = comparison_chart(evals, out_dir / "eval-scores.png")
        figures.append(chart)
    probe_rows = stats.rows(run.grad_stats)
    probe = None
    if probe_rows:
        from pipeline.training.grad_plots import plot_grad_stats

        probe = plot_grad_stats(probe_rows, out_dir / "grad-probe.png", metrics=metrics)
        figures.append(probe)
    if len(figures) > 1:
        figures.append(_stack_pngs(figures, out_dir / "report.png"))
    step("writing the Markdown")
    text = _markdown(store, run, stats, metrics, evals, curves, chart, title, (probe_rows, probe))
    markdown = out_dir / REPORT_NAME
    markdown.write_text(text, encoding="utf-8")
    return RunReport(markdown, figures, anchor.name, [e.name for e in run.lineage])


def default_report_dir(store: DatasetStore, anchor: Entry) -> Path:
    """``<workspace>/reports/run-<anchor dataset>/``."""
    return store.workspace / "reports" / f"run-{anchor.name}"


class _Stats:
    """Aggregates of the run's datasets, through the read-only SQL interface (one query each)."""

    def __init__(self, store: DatasetStore, run: _Run) -> None:
        self.store = store
        self.run = run

    def query(self, sql: str) -> list[dict[str, Any]]:
        columns, rows = run_readonly_query(self.store.catalog, self.store.lake, sql)
        return [dict(zip(columns, row, strict=True)) for row in rows]

    def rows(self, entry: Entry | None) -> list[dict[str, Any]]:
        if entry is None:
            return []
        return self.query(f'SELECT * FROM "{entry.name}"')

    def prompts(self) -> list[dict[str, Any]]:
        entry = self.run.one("prompts")
        if entry is None:
            return []
        return self.query(
            f'SELECT split, task_type, count(*) AS prompts FROM "{entry.name}" GROUP BY ALL ORDER BY ALL'
        )

    def generations(self) -> list[dict[str, Any]]:
        entry = self.run.one("generations")
        if entry is None:
            return []
        return self.query(
            "SELECT mode, count(*) AS rows, count(DISTINCT prompt_id) AS prompts, "
            "sum(CASE WHEN parse_ok THEN 0 ELSE 1 END) AS parse_failures, "
            "avg(trace_tokens) AS trace_tokens, avg(answer_tokens) AS answer_tokens, "
            "avg(CASE WHEN budget_forced THEN 1.0 ELSE 0.0 END) AS budget_closed, "
            "avg(CASE WHEN finish_reason = 'length' THEN 1.0 ELSE 0.0 END) AS answer_cut "
            f'FROM "{entry.name}" GROUP BY mode ORDER BY mode DESC'
        )

    def scores(self) -> list[dict[str, Any]]:
        entry = self.run.one("scores")
        if entry is None:
            return []
        return self.query(
            "SELECT mode, count(*) AS answers, avg(score) AS mean_score, "
            "avg(CASE WHEN score >= 1 THEN 1.0 ELSE 0.0 END) AS full_score "
            f'FROM "{entry.name}" GROUP BY mode ORDER BY mode DESC'
        )

    def pairs(self) -> list[dict[str, Any]]:
        out = []
        for kind in ("pairs_trace", "pairs_empty"):
            entry = self.run.one(kind)
            if entry is None:
                continue
            row = self.query(
                "SELECT count(*) AS pairs, avg(margin) AS margin, avg(chosen_score) AS chosen, "
                f'avg(rejected_score) AS rejected FROM "{entry.name}"'
            )[0]
            out.append({"kind": kind, "mode": kind.removeprefix("pairs_"), "name": entry.name, **row})
        return out

    def rejects(self) -> list[dict[str, Any]]:
        if not self.run.rejects:
            return []
        union = " UNION ALL ".join(f'SELECT stage, reason FROM "{r.name}"' for r in self.run.rejects)
        return self.query(
            f"SELECT stage, reason, count(*) AS n FROM ({union}) GROUP BY ALL ORDER BY n DESC, stage, reason"
        )


def _markdown(
    store: DatasetStore,
    run: _Run,
    stats: _Stats,
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


def _training_lines(run: _Run, metrics: list[dict[str, Any]], curves: Path | None) -> list[str]:
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
    others = run.by_kind.get("train_metrics", [])[1:]
    if others:
        lines.append("Also trained for the comparison: " + ", ".join(f"`{e.name}`" for e in others) + ".")
    if curves is not None:
        lines += ["", f"![BVPO training curves]({curves.name})"]
    return lines


def _probe_lines(run: _Run, rows: list[dict[str, Any]], figure: Path | None) -> list[str]:
    """The gradient probe: α̂* with its interval per probe, and the trace-induced variance of g_t and g_c."""
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
        "| step | α used | α̂* [95% interval] | tr Var_r[g_t] | tr Var_r[g_c] | MSE trace | MSE empty "
        "| MSE α |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['step']} | {r['alpha']:.3g} | "
            f"{r['alpha_hat']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | "
            f"{_sci(r.get('trace_var_t'))} | {_sci(r.get('trace_var_c'))} | {_sci(r['mse_trace'])} | "
            f"{_sci(r['mse_empty'])} | {_sci(r['mse_alpha'])} |"
        )
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


def _setup(run: _Run) -> dict[str, str]:
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
    if (pt := run.one("pairs_trace")) is not None:
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


def _stack_pngs(paths: Sequence[Path], out: Path) -> Path:
    """One PNG of several, stacked vertically on a white background (for pasting into a PR)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import numpy as np

    images = [mpimg.imread(str(p)) for p in paths]
    images = [np.dstack([i, np.ones(i.shape[:2])]) if i.shape[2] == 3 else i for i in images]
    width = max(i.shape[1] for i in images)
    padded = []
    for image in images:
        pad = width - image.shape[1]
        padded.append(np.pad(image, ((0, 0), (pad // 2, pad - pad // 2), (0, 0)), constant_values=1.0))
    mpimg.imsave(str(out), np.vstack(padded))
    return out
