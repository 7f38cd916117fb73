"""The `bvpo` CLI as a new user meets it: help, examples, one-line errors, `bvpo config`, `bvpo report`."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from flows.cli import app
from pipeline.config import PipelineConfig, load_config
from pipeline.reporting.config_reference import DOC_PATH, config_reference_markdown
from tests.synthetic_workspace import EVAL_RUN, REFRESH_RUN, TRAIN_RUN, SyntheticRun, build_workspace

ROOT = Path(__file__).resolve().parents[1]
WIDE = {"COLUMNS": "200", "NO_COLOR": "1"}


def _invoke(*args: str) -> typer.testing.Result:
    return CliRunner().invoke(app, list(args), env=WIDE)


def _commands() -> dict[str, object]:
    return typer.main.get_command(app).commands  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> SyntheticRun:
    return build_workspace(tmp_path_factory.mktemp("cli") / "workspace")


# --- help ----------------------------------------------------------------------------------------------


def test_help_lists_every_command_with_a_one_line_summary() -> None:
    result = _invoke("--help")
    assert result.exit_code == 0
    commands = _commands()
    assert {"run", "config", "report", "sql", "datasets", "lineage", "serve", "server"} <= set(commands)
    for name, command in commands.items():
        summary = inspect.cleandoc(command.help or "").split("\n\n")[0]
        assert summary and "\n" not in summary, f"{name}: the first paragraph of its help spans lines"
        assert re.search(rf"│ {re.escape(name)}\s+{re.escape(summary[:40])}", result.output), name


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_command_shows_examples_in_its_help(name: str) -> None:
    help_text = inspect.cleandoc(_commands()[name].help or "")  # type: ignore[attr-defined]
    examples = [line.strip() for line in help_text.splitlines() if line.strip().startswith("bvpo ")]
    assert "Example" in help_text and examples, f"bvpo {name} has no examples in its help"
    shown = _invoke(name, "--help")
    assert shown.exit_code == 0
    for example in examples:  # verbatim: nothing eaten by rich markup (e.g. '[vllm]')
        assert example in shown.output, example


# --- errors --------------------------------------------------------------------------------------------


def _one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("error: ") and "Traceback" not in output
    return lines[0]


def test_config_errors_name_each_bad_key_on_one_line() -> None:
    result = _invoke("config", "--set", "train.alpha=3", "--set", "nope.key=1")
    assert result.exit_code == 1
    line = _one_error_line(result.output)
    assert line.startswith("error: invalid config: ")
    assert "train.alpha: " in line and "nope: unknown key" in line


def test_debug_shows_the_exception_instead() -> None:
    result = _invoke("config", "--set", "nope.key=1", "--debug")
    assert result.exit_code == 1
    assert type(result.exception).__name__ == "ValidationError"


def test_usage_errors_are_one_line_too() -> None:
    result = _invoke("sql")
    assert result.exit_code == 2
    assert "Missing argument" in _one_error_line(result.output)
    assert "--help" in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--config", "missing.yaml"],
        ["config", "--config", "missing.yaml"],
        ["report", "-w", "{empty}"],
        ["sql", "select 1", "-w", "{empty}"],
        ["datasets", "-w", "{empty}"],
        ["lineage", "prompts", "-w", "{empty}"],
        ["compare", "-w", "{empty}"],
        ["export", "alpaca-eval", "-o", "{empty}/x.json", "-w", "{empty}"],
        ["deploy", "--work-pool", "gpu"],
    ],
    ids=lambda args: args[0],
)
def test_command_failures_are_one_line(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    result = _invoke(*[a.replace("{empty}", str(tmp_path)) for a in args])
    assert result.exit_code == 1, result.output
    _one_error_line(result.output)


# --- bvpo config ---------------------------------------------------------------------------------------


def test_config_prints_the_effective_config_as_a_loadable_file(tmp_path: Path) -> None:
    args = ["--config", str(ROOT / "configs/tiny.yaml"), "--set", "train.alpha=1.0", "--set", "eval.seed=7"]
    result = _invoke("config", *args)
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    assert printed["train"]["alpha"] == 1.0 and printed["eval"]["seed"] == 7
    assert printed["prompts"]["num_prompts"] == 16  # from the file
    assert printed["train"]["beta"] == PipelineConfig().train.beta  # a default
    (tmp_path / "effective.yaml").write_text(result.output)
    expected = load_config(ROOT / "configs/tiny.yaml", ["train.alpha=1.0", "eval.seed=7"])
    assert load_config(tmp_path / "effective.yaml") == expected


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_loads_and_validates(path: Path) -> None:
    config = load_config(path)
    raw = yaml.safe_load(path.read_text())
    assert raw, f"{path.name} is empty"
    # Every section the file names is one the model knows (unknown keys would have raised above).
    assert set(raw) <= set(PipelineConfig.model_fields)
    assert _invoke("config", "--config", str(path)).exit_code == 0
    if path.name.startswith("gpu-") or path.name == "multinode.yaml":
        assert config.generation.reasoning.control == "native"
        assert any(s.name == "reward_model" for s in config.scoring.scorers)
    if path.name == "multinode.yaml":
        assert config.generation.engine == "openai"
        assert config.train.num_processes > 1 and config.train.distributed == "fsdp"


def test_configuration_reference_is_up_to_date() -> None:
    checked_in = (ROOT / DOC_PATH).read_text(encoding="utf-8")
    assert checked_in == config_reference_markdown(), (
        "docs/configuration.md is stale: run `bvpo config --reference --output docs/configuration.md`"
    )


def test_reference_documents_every_key_with_its_default() -> None:
    text = config_reference_markdown()
    for section, model in PipelineConfig.model_fields.items():
        annotation = model.annotation
        if isinstance(annotation, type) and issubclass(annotation, PipelineConfig.__base__):  # a section
            assert f"## `{section}`" in text, section
            for key in annotation.model_fields:
                assert re.search(rf"^\| `{key}` \|", text, re.M), f"{section}.{key}"
    assert "| `samples_per_prompt` | `int` | `4` |" in text
    assert "`Skywork/Skywork-Reward-V2-Llama-3.1-8B`" not in text  # no invented defaults
    assert "| `model` | `str` | **required** |" in text  # reward model id has no default


def test_reference_option_writes_the_file(tmp_path: Path) -> None:
    out = tmp_path / "docs" / "configuration.md"
    result = _invoke("config", "--reference", "--output", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_text(encoding="utf-8") == config_reference_markdown()


# --- bvpo report ---------------------------------------------------------------------------------------


def _report(run: SyntheticRun, *args: str) -> typer.testing.Result:
    return _invoke("report", *args, "-w", str(run.workspace))


@pytest.mark.parametrize(
    "selector", [EVAL_RUN, TRAIN_RUN[:8], "latest", "eval_results__v1", "train_metrics__v1", "train_metrics"]
)
def test_a_run_is_found_from_any_of_its_handles(run: SyntheticRun, selector: str) -> None:
    from storage import DatasetStore
    from storage.runs import CatalogView, resolve_run

    view = CatalogView(DatasetStore(run.workspace))
    assert resolve_run(view, selector).name == "eval_results__v1"  # training extends to its evaluation


def test_unknown_ambiguous_and_too_short_run_ids_are_refused(run: SyntheticRun, tmp_path: Path) -> None:
    from storage import DatasetStore, schema_for
    from storage.runs import CatalogView, RunNotFound, resolve_run

    view = CatalogView(DatasetStore(run.workspace))
    with pytest.raises(RunNotFound, match=r"no dataset .* flow run 'deadbeef'"):
        resolve_run(view, "deadbeef")
    with pytest.raises(RunNotFound):
        resolve_run(view, EVAL_RUN[:4])  # prefixes need 6+ characters
    assert resolve_run(view, REFRESH_RUN).kind == "ref_logps"  # a data refresh alone: its last dataset
    assert resolve_run(view, run.datasets["pairs_trace"].version).name == "pairs_trace__v1"

    store = DatasetStore(tmp_path / "ws")
    for i, run_id in enumerate(
        ["abcdef01-0000-4000-8000-000000000000", "abcdef02-0000-4000-8000-000000000000"]
    ):
        store.put(
            "prompts", schema_for("prompts").empty_table(), config={"i": i}, parents=[], flow_run_id=run_id
        )
    view = CatalogView(store)
    with pytest.raises(RunNotFound, match="matches 2 flow runs"):
        resolve_run(view, "abcdef")
    assert resolve_run(view, "abcdef02").name == "prompts__v2"


@pytest.fixture(scope="module")
def written(run: SyntheticRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of the synthetic run, written once by `bvpo report <flow run id> --output DIR`."""
    out = tmp_path_factory.mktemp("report")
    result = _report(run, EVAL_RUN, "--output", str(out))
    assert result.exit_code == 0, result.output
    assert f"wrote {out / 'report.md'}" in result.output
    return out / "report.md"


def test_report_names_every_dataset_and_flow_run_of_the_run(written: Path) -> None:
    text = written.read_text()
    for name in (
        "prompts__v1",
        "generations__v1",
        "pairs_trace__v1",
        "train_metrics__v1",
        "eval_results__v1",
    ):
        assert f"`{name}`" in text, name
    assert "`rejects__v1`" in text and "`grad_stats__v1`" in text  # siblings with the run's inputs
    for run_id in (REFRESH_RUN, TRAIN_RUN, EVAL_RUN):
        assert run_id in text


def test_report_content_matches_the_datasets(run: SyntheticRun, written: Path) -> None:
    from storage import DatasetStore

    text = written.read_text()
    store = DatasetStore(run.workspace)
    pairs_t, pairs_e = run.datasets["pairs_trace"].row_count, run.datasets["pairs_empty"].row_count
    assert re.search(rf"\| D_t `pairs_trace__v1` \| trace \| {pairs_t} \|", text)
    assert re.search(rf"\| D_e `pairs_empty__v1` \| empty \| {pairs_e} \|", text)
    metrics = store.read_rows(run.datasets["train_metrics"])
    assert f"| L_BVPO | {metrics[0]['loss']:.4f} | {metrics[-1]['loss']:.4f} |" in text
    assert "**α = 0.5**" in text and "α² = 0.25" in text
    evals = store.read_rows(run.datasets["eval_results"])
    score = next(
        r for r in evals if (r["model_label"], r["mode"], r["metric"]) == ("trained", "trace", "score")
    )
    assert f"{score['value']:.3f} [{score['ci_low']:.3f}, {score['ci_high']:.3f}]" in text
    probes = store.read_rows(run.datasets["grad_stats"])
    assert (
        f"**α̂* = {probes[-1]['alpha_hat']:.3f}** [{probes[-1]['ci_low']:.3f}, {probes[-1]['ci_high']:.3f}]"
        in text
    )
    assert len(re.findall(r"^\| \d+ \| 0\.5 \| 0\.\d{3} \[", text, re.M)) == len(probes)
    for png in ("training-curves.png", "eval-scores.png", "grad-probe.png", "report.png"):
        assert (written.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](training-curves.png)" in text and "](eval-scores.png)" in text


def test_report_of_a_data_refresh_run_has_no_training(run: SyntheticRun, tmp_path: Path) -> None:
    result = _report(run, REFRESH_RUN, "--output", str(tmp_path))
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report.md").read_text()
    assert "No training in this run" in text and "No evaluation in this run" in text
    assert "`train_metrics__v1`" not in text
    assert not (tmp_path / "training-curves.png").exists()


def test_report_asks_prefect_for_names_and_parent_runs(
    run: SyntheticRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.runs

    parent = "11111111-2222-4333-8444-555555555555"
    calls: list[str] = []

    def family(name: str) -> tuple[str, list[str]]:
        calls.append(name)
        if name != "crimson-lemur":
            raise LookupError(f"Prefect has no flow run with id or name '{name}'")
        return "crimson-lemur", [parent, REFRESH_RUN, TRAIN_RUN, EVAL_RUN]

    monkeypatch.setattr(flows.runs, "flow_run_family", family)
    found = _report(run, "crimson-lemur")
    assert found.exit_code == 0, found.output
    text = (run.workspace / "reports" / "run-eval_results__v1" / "report.md").read_text()  # the default
    assert text.startswith(f"# BVPO run report: crimson-lemur ({parent})")
    missing = _report(run, "quiet-otter")
    assert missing.exit_code == 1
    assert "quiet-otter" in missing.output.splitlines()[-1] and "Traceback" not in missing.output
    assert calls == ["crimson-lemur", "quiet-otter"]


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_prefect_lookup_finds_a_run_by_name_with_its_subflows() -> None:
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from flows.runs import checkpoint_datasets, flow_run_family

    @flow(name="child")
    def child() -> str:
        from prefect.runtime import flow_run

        return str(flow_run.id)

    @flow(name="parent")
    def parent() -> tuple[str, str]:
        from prefect.runtime import flow_run

        return str(flow_run.id), child()

    with prefect_test_harness(server_startup_timeout=120):
        state = parent(return_state=True)
        parent_id, child_id = state.result()
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            name = client.read_flow_run(parent_id).name
        assert flow_run_family(name) == (name, [parent_id, child_id])
        assert flow_run_family(parent_id)[1] == [parent_id, child_id]
        with pytest.raises(LookupError, match="no flow run"):
            flow_run_family("no-such-run")
        assert checkpoint_datasets([parent_id, child_id]) == []


def test_run_prints_its_summary_and_writes_the_report(
    run: SyntheticRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`bvpo run` glue, with the flow replaced by a stand-in returning the synthetic run's output."""
    import sys
    import types

    import flows.cli.run

    parent = "99999999-8888-4777-8666-555555555555"
    refs = run.datasets
    summary = {
        "datasets": {
            k: {"name": refs[k].name, "rows": refs[k].row_count} for k in ("prompts", "generations")
        },
        "pairs": {"trace": refs["pairs_trace"].row_count, "empty": refs["pairs_empty"].row_count},
        "loss": {"first": 0.693, "last": 0.5, "steps": 6},
        "eval": {"trace": {"reference": 0.25, "trained": 1.0}, "empty": {"reference": 0.5, "trained": 1.0}},
        "checkpoint": str(run.workspace / "checkpoints" / "synthetic"),
        "paths": {"workspace": str(run.workspace), "catalog": str(run.workspace / "catalog.duckdb")},
    }
    output = types.SimpleNamespace(summary=summary, eval_results=refs["eval_results"])
    state = types.SimpleNamespace(
        result=lambda: output, state_details=types.SimpleNamespace(flow_run_id=parent)
    )
    seen: list[PipelineConfig] = []

    def fake_pipeline(config: PipelineConfig, return_state: bool = False) -> object:
        seen.append(config)
        return state

    pipeline = types.ModuleType("flows.pipeline")  # a stand-in module: no Prefect import, no flow run
    pipeline.bvpo_pipeline = fake_pipeline  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flows.pipeline", pipeline)
    monkeypatch.setattr(flows.cli.run, "_flow_run_name", lambda run_id: "crimson-lemur")
    result = _invoke("run", "--set", f"workspace={run.workspace}", "--set", "train.alpha=0.25")
    assert result.exit_code == 0, result.output
    assert seen[0].train.alpha == 0.25
    assert f"D_t (reasoning on) {refs['pairs_trace'].row_count}" in result.output
    report = run.workspace / "reports" / "run-eval_results__v1" / "report.md"
    assert f"Report:     {report}" in result.output and "bvpo report crimson-lemur" in result.output
    assert report.read_text().startswith(f"# BVPO run report: crimson-lemur ({parent})")

    def failing(config: PipelineConfig, return_state: bool = False) -> object:
        raise RuntimeError("generation failed: the vLLM engine died\nstack details")

    monkeypatch.setattr(pipeline, "bvpo_pipeline", failing)
    failed = _invoke("run", "--set", f"workspace={tmp_path}")
    assert failed.exit_code == 1
    assert _one_error_line(failed.output) == (
        "error: generation failed: the vLLM engine died (--debug shows the rest)"
    )
