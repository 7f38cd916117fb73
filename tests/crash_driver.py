"""Run one pipeline stage and stop at a chosen crash point, to be SIGKILLed there by the test.

``python -m tests.crash_driver <request.json>`` runs one request; ``python -m tests.crash_driver --serve``
imports everything once and forks one child per request path read from stdin (what the fast tests use:
a forked child starts in milliseconds instead of seconds). A request names the stage, the config, its
input datasets, the crash point ``kill_at`` (1-based; 0: none), a flag file, and whether to replace vLLM
with the scripted in-process engine (``fake_engine``, default true).

Crash points are the calls after (or before) which losing the process could hurt: every Parquet part
written, a dataset renamed into place, the registration transaction before its COMMIT and after it, a
generation shard sampled and written, a stage's result computed but not registered, each training step,
each training state written (before and after its rename) and the final checkpoint saved. On reaching
``kill_at`` the driver writes the flag file and sleeps; the test kills it with SIGKILL, as a crashed
machine would. The same points are counted in the test process on an uninterrupted run
(:func:`install_points`), so kill points can be drawn from all of them with a seeded random generator.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

POINTS: tuple[tuple[str, str, str], ...] = (
    ("storage.parquet_io", "_write_part", "after"),
    ("storage.lakefs", "LakeFS.publish", "after"),
    ("storage.catalog", "dataset_glob", "before"),  # inside the registration transaction, before COMMIT
    ("storage.catalog", "CatalogWriter.insert", "after"),  # committed, catalog lock still held
    ("pipeline.generation.runner", "generate_responses", "after"),  # a shard sampled, not written
    ("pipeline.generation.shards", "ShardStore.write", "after"),
    ("pipeline.evaluation.engine", "generate_for_models", "after"),  # evaluation: every model's samples
    ("pipeline.scoring.stage", "_run", "after"),  # scored, not registered
    ("pipeline.pairing", "build_pairs", "after"),
    ("pipeline.training.trainer", "BVPOTrainer.train_step", "after"),
    ("torch", "save", "after"),  # a training state written to its .tmp file, not renamed
    ("pipeline.training.trainer", "BVPOTrainer.save_state", "after"),
    ("pipeline.training.run", "save_hf_checkpoint", "after"),
)


def install_points(on_point: Callable[[str], None]) -> Callable[[], None]:
    """Wrap every crash point so ``on_point(label)`` runs there; return a function that unwraps them."""
    restore: list[tuple[Any, str, Any]] = []
    for module_name, path, when in POINTS:
        owner: Any = importlib.import_module(module_name)
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        label = f"{when} {module_name}.{path}"
        restore.append((owner, name, original))
        setattr(owner, name, _wrap(original, label, when, on_point))

    def undo() -> None:
        for owner, name, original in reversed(restore):
            setattr(owner, name, original)

    return undo


def _wrap(function: Any, label: str, when: str, on_point: Callable[[str], None]) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if when == "before":
            on_point(label)
        result = function(*args, **kwargs)
        if when == "after":
            on_point(label)
        return result

    return wrapper


def run_stage(stage: str, config: Any, inputs: dict[str, Any]) -> Any:
    """Run one stage task's function (as a flow run would) on registered input datasets."""
    import tasks.stages as stages

    if stage == "generate":
        return stages.generate_task.fn(config, inputs["prompts"])
    if stage == "score":
        return stages.score_task.fn(config, inputs["prompts"], inputs["generations"])
    if stage == "pair":
        return stages.pair_task.fn(config, inputs["generations"], inputs["scores"])
    if stage == "train":
        return stages.train_task.fn(config, inputs["pairs_trace"], inputs["pairs_empty"], inputs["ref_logps"])
    if stage == "eval":
        return stages.evaluate_task.fn(
            config, inputs["prompts"], inputs["checkpoint"], inputs["train_metrics"]
        )
    raise ValueError(f"unknown stage {stage}")


def _run_request(request_path: str) -> None:
    """Run the stage of a request, stopping (for the SIGKILL) at its crash point."""
    import pipeline.evaluation.engine as eval_engine
    import pipeline.generation.worker as worker
    from pipeline.config import PipelineConfig
    from storage import DatasetRef
    from tests.reliability_helpers import fake_child_process, fake_eval_engine, quiet_prefect

    request = json.loads(Path(request_path).read_text())
    if request.get("fake_engine", True):
        for name, value in fake_child_process().items():
            setattr(worker, name, value)
        eval_engine.generate_for_models = fake_eval_engine()  # type: ignore[assignment]
    config = PipelineConfig.model_validate(request["config"])
    inputs = {k: DatasetRef(**v) if isinstance(v, dict) else v for k, v in request["inputs"].items()}
    kill_at, flag = int(request["kill_at"]), Path(request["flag"])
    reached = [0]

    def on_point(label: str) -> None:
        reached[0] += 1
        if reached[0] == kill_at:
            flag.write_text(json.dumps({"pid": os.getpid(), "point": reached[0], "label": label}))
            time.sleep(600)  # the test SIGKILLs us here

    install_points(on_point)
    with quiet_prefect():
        run_stage(request["stage"], config, inputs)


def serve() -> None:
    """Import everything once, then fork one child per request path read from stdin.

    For each request it prints ``pid <pid>`` when the child starts and ``exit <pid> <code>`` when it ends
    (``-9`` once the test has SIGKILLed it). A forked child skips the imports (seconds each on a loaded
    machine), so many crash points cost little. The parent runs no torch, Arrow or DuckDB work before
    forking, so the children inherit no thread pools.
    """
    import threading

    import torch

    # transformers imports its model and tokenizer classes lazily, on first use: do it here, once.
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import pipeline.training.run  # noqa: F401  (import once here, not in every child)
    import tasks.stages  # noqa: F401
    import tests.reliability_helpers  # noqa: F401
    from pipeline.scoring import verifiable  # noqa: F401

    torch.set_num_threads(1)  # as in the test process: same numerics, and fast on a busy CPU
    if threading.active_count() != 1:
        print(f"warning: {threading.active_count()} threads before fork", file=sys.stderr, flush=True)
    for line in sys.stdin:
        request_path = line.strip()
        if not request_path:
            continue
        pid = os.fork()
        if pid == 0:  # the child: never returns into this loop
            code = 1
            try:
                log = os.open(f"{request_path}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                _run_request(request_path)
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {pid} {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        serve()
    else:
        _run_request(sys.argv[1])
