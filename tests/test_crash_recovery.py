"""SIGKILL during generate, score, pair, train and eval, at seeded random points; the rerun matches an
uninterrupted run (registered datasets, row counts, contents, training metrics and weights).

Fast cases (not e2e): each stage runs in a child process forked by ``tests/crash_driver.py --serve`` on
small inputs, with the tiny random Llama for model work and a scripted in-process engine instead of vLLM.
Three kill points per stage are drawn with a seeded generator from every crash point an uninterrupted run
passes (Parquet parts, publish, the registration transaction before and after COMMIT, shards, scoring,
pairing, training steps and states, the checkpoint); each resumed run is killed again at the next point
(or finishes first). After every kill, each registered dataset must read back whole and be one the
uninterrupted run registered; the final rerun (in this process) must equal the uninterrupted run.

e2e cases: generation and evaluation through real vLLM on the embedded SmolLM2, the stage's process and
its vLLM engine processes killed together (as a machine crash would), then rerun.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

import tasks.stages as stages
from pipeline.config import PipelineConfig
from storage import DatasetRef, DatasetStore
from tests.crash_driver import install_points, run_stage
from tests.reliability_helpers import (
    catalog_rows,
    install_fake_child_process,
    pipeline_config,
    quiet_prefect,
    write_prompt_file,
)
from tests.tiny_checkpoint import save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
SEED = 20_251_105
KILLS_PER_STAGE = 3
UPSTREAM = {
    "generate": ("prompts",),
    "score": ("prompts", "generations"),
    "pair": ("generations", "scores"),
    "train": ("pairs_trace", "pairs_empty", "ref_logps"),
    "eval": ("prompts", "checkpoint", "train_metrics"),
}
VOLATILE = {"seconds", "tokens_per_s", "mfu", "checkpoint", "model"}  # timings and paths
"""Columns that legitimately differ between two runs in two workspaces (timings, absolute paths)."""

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(autouse=True)
def _fake_engine_one_thread(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The scripted engine for vLLM (not in e2e tests); one torch thread (10x faster on a busy CPU)."""
    if request.node.get_closest_marker("e2e") is None:
        install_fake_child_process(monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with quiet_prefect():
            yield
    finally:
        torch.set_num_threads(threads)


def _inputs(config: PipelineConfig, stage: str) -> dict[str, Any]:
    """Run the stages before ``stage`` (in this process) and return the inputs it takes."""
    done: dict[str, Any] = {"prompts": stages.prompts_task.fn(config)}
    chain = ["generate", "score", "pair", "train", "eval"]
    for step in chain[: chain.index(stage)]:
        if step == "generate":
            done["generations"] = stages.generate_task.fn(config, done["prompts"])
        elif step == "score":
            done["scores"] = stages.score_task.fn(config, done["prompts"], done["generations"])
        elif step == "pair":
            done["pairs_trace"], done["pairs_empty"] = stages.pair_task.fn(
                config, done["generations"], done["scores"]
            )
            done["ref_logps"] = stages.reference_logps_task.fn(
                config, done["pairs_trace"], done["pairs_empty"]
            )
        elif step == "train":
            out = stages.train_task.fn(config, done["pairs_trace"], done["pairs_empty"], done["ref_logps"])
            done["checkpoint"], done["train_metrics"] = out.checkpoint, out.metrics
    return {name: done[name] for name in UPSTREAM[stage]}


def _uninterrupted(config: PipelineConfig, stage: str) -> tuple[dict[str, Any], list[str]]:
    """Inputs and the crash points an uninterrupted run of ``stage`` passes (labels, in order)."""
    inputs = _inputs(config, stage)
    passed: list[str] = []
    undo = install_points(passed.append)
    try:
        run_stage(stage, config, inputs)
    finally:
        undo()
    return inputs, passed


class CrashServer:
    """``tests/crash_driver.py --serve``: forks one stage run per request, to be SIGKILLed at a point."""

    def __init__(self, log: Path) -> None:
        self.log = open(log, "wb")  # noqa: SIM115  (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.crash_driver", "--serve"],
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        self._buffer = b""

    def _line(self, timeout_s: float) -> str | None:
        """The server's next line, or None when none is complete within ``timeout_s``."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:  # raw reads: two lines may arrive in one chunk
            ready, _, _ = select.select([fd], [], [], timeout_s)
            if not ready:
                return None
            chunk = os.read(fd, 4096)
            assert chunk, f"the crash server died: {Path(self.log.name).read_text()}"
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode().strip()

    def run(self, config: PipelineConfig, stage: str, inputs: dict[str, Any], point: int, tmp: Path) -> Any:
        """Run ``stage`` in a forked child; SIGKILL it at crash point ``point``.

        Returns what the child reported at that point, or None when it finished before reaching it.
        """
        flag = tmp / f"reached-{stage}-{point}-{time.monotonic_ns()}.json"
        request = flag.with_suffix(".request")
        refs = {k: v.model_dump() if isinstance(v, DatasetRef) else v for k, v in inputs.items()}
        request.write_text(
            json.dumps(
                {
                    "stage": stage,
                    "config": config.model_dump(mode="json"),
                    "inputs": refs,
                    "kill_at": point,
                    "flag": str(flag),
                }
            )
        )
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{request}\n".encode())
        self.proc.stdin.flush()
        started = self._line(60)
        assert started and started.startswith("pid "), started
        pid = int(started.split()[1])
        deadline = time.monotonic() + 120
        while not flag.exists():
            ended = self._line(0.02)
            if ended is not None:
                log = Path(f"{request}.log").read_text()
                assert ended == f"exit {pid} 0", f"{ended}:\n{log}"
                return None
            assert time.monotonic() < deadline, f"the stage never reached point {point}"
        time.sleep(0.05)  # the flag is written: let the child settle into its sleep
        os.kill(pid, signal.SIGKILL)
        assert self._line(30) == f"exit {pid} -{signal.SIGKILL}"
        return json.loads(flag.read_text())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    crash_server = CrashServer(tmp_path_factory.mktemp("server") / "server.log")
    yield crash_server
    crash_server.close()


def _readable(workspace: Path) -> list[tuple[str, str, int]]:
    """Every registered dataset, each checked to read back whole (files, schema, row count)."""
    store = DatasetStore(workspace)
    rows = catalog_rows(workspace)
    for name, _, count in rows:
        assert store.read(store.catalog.resolve(name)).num_rows == count, name
    return rows


def _contents(workspace: Path) -> dict[str, list[dict[str, Any]]]:
    """Each registered dataset's rows, sorted, without the columns that hold timings or paths."""
    store = DatasetStore(workspace)
    out = {}
    for name, _, _ in catalog_rows(workspace):
        table = store.read(store.catalog.resolve(name))
        table = table.drop([c for c in table.column_names if c in VOLATILE])
        out[name] = sorted(table.to_pylist(), key=lambda r: json.dumps(r, sort_keys=True, default=str))
    return out


def _approx_equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-6, abs=1e-6, nan_ok=True)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_approx_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_approx_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _leftovers(workspace: Path) -> list[str]:
    """Staging folders and temporary files still lying around."""
    found = [p for p in (workspace / "lake").rglob(".tmp-*")]
    found += (
        [p for p in (workspace / "checkpoints").glob(".tmp-*")]
        if (workspace / "checkpoints").exists()
        else []
    )
    staging = workspace / "staging"
    found += [p for p in staging.rglob("*") if p.is_file()] if staging.exists() else []
    return sorted(str(p.relative_to(workspace)) for p in found)


@pytest.mark.parametrize("stage", ["generate", "score", "pair", "train", "eval"])
def test_sigkill_at_random_points_then_rerun_equals_an_uninterrupted_run(
    tmp_path: Path, tiny: Path, server: CrashServer, stage: str
) -> None:
    source = write_prompt_file(tmp_path / "prompts.jsonl", 8)
    clean = pipeline_config(tmp_path / "clean", tiny, source)
    _, points = _uninterrupted(clean, stage)
    expected = catalog_rows(clean.workspace)
    rng = random.Random(f"{SEED}:{stage}")
    kills = rng.sample(range(1, len(points) + 1), min(KILLS_PER_STAGE, len(points)))

    crashed = pipeline_config(tmp_path / "crashed", tiny, source)
    inputs = _inputs(crashed, stage)
    before = catalog_rows(crashed.workspace)
    for round_, point in enumerate(kills):
        reached = server.run(crashed, stage, inputs, point, tmp_path)
        if round_ == 0:  # the first run is a fresh one: it passes the same points as the uninterrupted run
            assert reached is not None and reached["label"] == points[point - 1]
        where = "finished first" if reached is None else f"killed at {reached['label']}"
        print(f"{stage} run {round_ + 1}: point {point} of {len(points)}: {where}")
        # Right after a crash, whatever is registered is whole and is what the uninterrupted run registered.
        registered = _readable(crashed.workspace)
        assert registered[: len(before)] == before
        if stage != "eval":  # evaluation versions hold the checkpoint's absolute path, which differs
            assert set(registered) <= set(expected)

    run_stage(stage, crashed, inputs)
    after = _readable(crashed.workspace)
    assert [(n, c) for n, _, c in after] == [(n, c) for n, _, c in expected]
    if stage != "eval":
        assert after == expected
    assert _approx_equal(_contents(crashed.workspace), _contents(clean.workspace))
    assert _leftovers(crashed.workspace) == []
    if stage == "train":
        ckpt = {w: DatasetStore(w).workspace / "checkpoints" for w in (clean.workspace, crashed.workspace)}
        (a,), (b,) = (sorted(c.glob("*/model.safetensors")) for c in ckpt.values())
        weights_a, weights_b = load_file(str(a)), load_file(str(b))
        assert weights_a.keys() == weights_b.keys()
        for name, tensor in weights_a.items():
            assert torch.allclose(tensor, weights_b[name], atol=1e-6), name


# --- e2e: real vLLM (embedded SmolLM2-135M), the stage process and its engine killed together -----------


def _real_config(tmp_path: Path) -> PipelineConfig:
    """Few prompts, short generations, one prompt per shard: the smallest real run with several shards."""
    return PipelineConfig.model_validate(
        {
            "workspace": str(tmp_path / "ws"),
            "prompts": {"num_prompts": 4, "eval_fraction": 0.3, "seed": 3},  # 3 train prompts, 1 eval
            "generation": {
                "samples_per_prompt": 2,
                "max_trace_tokens": 8,
                "max_answer_tokens": 12,
                "max_model_len": 512,
                "shard_size": 1,
                "seed": 11,
            },
            "eval": {"samples_per_prompt": 1, "temperature": 0.0, "bootstrap_samples": 20},
        }
    )


def _processes() -> dict[int, tuple[int, int]]:
    """``pid -> (parent pid, process group)`` of every process (from /proc)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return out


def _engine_children(driver: subprocess.Popen[bytes]) -> list[int]:
    """The vLLM worker processes the driver started (each leads a session and group of its own)."""
    return [pid for pid, (ppid, _) in _processes().items() if ppid == driver.pid]


def _start_driver(config: PipelineConfig, stage: str, inputs: dict[str, Any], tmp: Path) -> Any:
    request = tmp / f"{stage}-request.json"
    refs = {k: v.model_dump() if isinstance(v, DatasetRef) else v for k, v in inputs.items()}
    payload = {"stage": stage, "config": config.model_dump(mode="json"), "inputs": refs, "kill_at": 0}
    request.write_text(json.dumps(payload | {"flag": str(tmp / "unused"), "fake_engine": False}))
    with open(tmp / f"{stage}-driver.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.crash_driver", str(request)],
            cwd=REPO,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )


def _kill_everything(driver: subprocess.Popen[bytes]) -> None:
    """SIGKILL the driver's group and every engine group it started, as a machine crash would; wait."""
    groups = {driver.pid, *_engine_children(driver)}
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    driver.wait(timeout=30)
    deadline = time.monotonic() + 60
    while any(pgid in groups for _, pgid in _processes().values()):
        assert time.monotonic() < deadline, "processes of the killed run are still alive"
        time.sleep(0.2)


def _wait_for(condition: Any, driver: subprocess.Popen[bytes], tmp: Path, what: str) -> None:
    deadline = time.monotonic() + 400
    while not condition():
        if driver.poll() is not None:
            log = next(tmp.glob("*-driver.log")).read_text()[-3000:]
            raise AssertionError(f"the driver exited ({driver.returncode}) before {what}:\n{log}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_e2e_generate_killed_mid_run_with_its_engine_then_the_rerun_completes_it(tmp_path: Path) -> None:
    config = _real_config(tmp_path)
    prompts = stages.prompts_task.fn(config)
    train = [p for p in DatasetStore(config.workspace).read_rows(prompts) if p["split"] == "train"]
    assert len(train) >= 3
    shard_dir = config.workspace / "staging" / "generations"
    point = random.Random(f"{SEED}:e2e-generate").randint(1, len(train) - 1)  # shards finished at the kill

    started = time.monotonic()
    driver = _start_driver(config, "generate", {"prompts": prompts}, tmp_path)
    _wait_for(lambda: len(list(shard_dir.glob("*/shard-*.parquet"))) >= point, driver, tmp_path, "the shards")
    _kill_everything(driver)
    print(f"generate: the killed run took {time.monotonic() - started:.0f} s")
    kept = {p.name: pq.read_table(p).to_pylist() for p in shard_dir.glob("*/shard-*.parquet")}
    print(f"generate: killed with {len(kept)} of {len(train)} shards finished (waited for {point})")
    assert point <= len(kept) < len(train)
    assert not list(shard_dir.glob("*/.*.tmp"))  # no half-written shard
    assert [name for name, _, _ in _readable(config.workspace)] == ["prompts__v1"]

    started = time.monotonic()
    generations = stages.generate_task.fn(config, prompts)  # the rerun, on a fresh engine
    print(f"generate: the rerun took {time.monotonic() - started:.0f} s")
    rows = DatasetStore(config.workspace).read_rows(generations)
    assert generations.row_count == len(train) * 2 * config.generation.samples_per_prompt
    assert len({r["generation_id"] for r in rows}) == len(rows)
    by_shard: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_shard.setdefault(row["shard_index"], []).append(row)
    for name, shard_rows in kept.items():  # finished shards were reused as they were, not regenerated
        index = int(name.removeprefix("shard-").removesuffix(".parquet"))
        key = "generation_id"
        assert sorted(by_shard[index], key=lambda r: r[key]) == sorted(shard_rows, key=lambda r: r[key])
    assert not shard_dir.exists() or not any(shard_dir.iterdir())
    assert [n for n, _, _ in _readable(config.workspace) if not n.startswith("rejects")] == [
        "prompts__v1",
        "generations__v1",
    ]


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_e2e_evaluate_killed_with_its_engine_then_the_rerun_completes_it(tmp_path: Path) -> None:
    from pipeline.model_assets import embedded_checkpoint

    config = _real_config(tmp_path)
    store = DatasetStore(config.workspace)
    prompts = stages.prompts_task.fn(config)
    n_eval = sum(p["split"] == "eval" for p in store.read_rows(prompts))
    assert n_eval >= 1
    checkpoint = str(embedded_checkpoint())  # evaluated as the "trained" model: a second engine run

    inputs = {"prompts": prompts, "checkpoint": checkpoint, "train_metrics": prompts}
    driver = _start_driver(config, "eval", inputs, tmp_path)
    # Killed while the reference model's engine starts or samples (the kill points after that are covered
    # without vLLM above); each engine start costs about 30 s, so the rerun's two are the budget.
    _wait_for(lambda: bool(_engine_children(driver)), driver, tmp_path, "the reference model's engine")
    delay = random.Random(f"{SEED}:e2e-eval").uniform(0.0, 20.0)
    time.sleep(delay)
    assert driver.poll() is None
    _kill_everything(driver)
    registered = [n for n, _, _ in _readable(config.workspace) if not n.startswith("rejects")]
    print(f"evaluate: killed {delay:.1f} s after its first engine process started; registered {registered}")
    assert registered in (["prompts__v1"], ["prompts__v1", "eval_generations__v1"])  # (a fast machine)

    results = stages.evaluate_task.fn(config, prompts, checkpoint, prompts)  # the rerun
    rows = store.read_rows(results)
    scores = {(r["model_label"], r["mode"]): r["n"] for r in rows if r["metric"] == "score"}
    assert scores == {
        (label, mode): n_eval for label in ("reference", "trained") for mode in ("trace", "empty")
    }
    names = [n for n, _, _ in _readable(config.workspace) if not n.startswith("rejects")]
    assert names == ["prompts__v1", "eval_generations__v1", "eval_generations__v2", "eval_results__v1"]
