"""Math benchmarks through EleutherAI's ``lm-eval`` harness and its vLLM backend (GSM8K, MATH-500, ...).

The harness is an optional tool (``pip install 'lm-eval[vllm]'``) and its tasks download their datasets
from the Hugging Face hub, so this module only builds the command, runs it when the harness is installed,
and reads its ``results*.json`` into ``eval_results``-shaped rows (value ± 1.96 standard errors). Reasoning
models: ``think_end_token`` makes the vLLM backend drop the trace before answers are extracted.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_TASKS = ("gsm8k", "minerva_math500")


class HarnessUnavailable(RuntimeError):
    """``lm-eval`` is not installed here."""


@dataclass(frozen=True)
class LmEvalRun:
    """One lm-eval run of a checkpoint with the vLLM backend."""

    checkpoint: str
    output_dir: Path
    tasks: Sequence[str] = DEFAULT_TASKS
    max_model_len: int = 4096
    max_gen_toks: int = 2048
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    think_end_token: str | None = "</think>"
    limit: int | None = None  # examples per task (None: all)
    extra_model_args: dict[str, Any] = field(default_factory=dict)

    def command(self) -> list[str]:
        """The ``lm_eval`` command line (chat template applied, greedy decoding, samples logged)."""
        model_args = {
            "pretrained": self.checkpoint,
            "dtype": "auto",
            "max_model_len": self.max_model_len,
            "tensor_parallel_size": self.tensor_parallel_size,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            **({"think_end_token": self.think_end_token} if self.think_end_token else {}),
            **self.extra_model_args,
        }
        command = [
            "lm_eval", "--model", "vllm",
            "--model_args", ",".join(f"{k}={v}" for k, v in model_args.items()),
            "--tasks", ",".join(self.tasks),
            "--apply_chat_template",
            "--gen_kwargs", f"max_gen_toks={self.max_gen_toks},temperature=0",
            "--batch_size", "auto",
            "--output_path", str(self.output_dir),
            "--log_samples",
        ]  # fmt: skip
        if self.limit is not None:
            command += ["--limit", str(self.limit)]
        return command


def harness_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None and shutil.which("lm_eval") is not None


def run_lm_eval(run: LmEvalRun, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run the harness and return its metrics as ``eval_results``-shaped rows.

    Raises:
        HarnessUnavailable: ``lm-eval`` is not installed.
        RuntimeError: the harness exited with an error (its last lines are in the message).
    """
    if not harness_available():
        raise HarnessUnavailable("lm-eval is not installed: pip install 'lm-eval[vllm]' (needs hub access)")
    run.output_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(run.command(), env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        raise RuntimeError(f"lm_eval failed (exit code {proc.returncode}):\n{tail}")
    return read_results(run.output_dir, label="harness", model=run.checkpoint)


def read_results(output_dir: Path, *, label: str, model: str) -> list[dict[str, Any]]:
    """Rows ``{model_label, model, mode, metric, value, ci_low, ci_high, n}`` from the newest results file.

    ``metric`` is ``<task>/<metric>,<filter>`` as the harness names it; the interval is value ± 1.96·stderr
    (None when the harness reports no stderr).
    """
    files = sorted(output_dir.rglob("results*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no lm-eval results*.json under {output_dir}")
    data = json.loads(files[-1].read_text())
    samples = data.get("n-samples", {})
    rows = []
    for task, metrics in sorted(data.get("results", {}).items()):
        n = int(samples.get(task, {}).get("effective", 0))
        for key, value in sorted(metrics.items()):
            name, _, filt = key.partition(",")
            if name == "alias" or name.endswith("_stderr") or not isinstance(value, int | float):
                continue
            stderr = metrics.get(f"{name}_stderr,{filt}" if filt else f"{name}_stderr")
            has_se = isinstance(stderr, int | float)
            rows.append(
                {
                    "model_label": label,
                    "model": model,
                    "mode": "harness",
                    "metric": f"{task}/{key}",
                    "value": float(value),
                    "ci_low": float(value) - 1.96 * stderr if has_se else None,
                    "ci_high": float(value) + 1.96 * stderr if has_se else None,
                    "n": n,
                }
            )
    return rows
