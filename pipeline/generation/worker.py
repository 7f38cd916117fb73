"""Run generation in a child process: ``python -m pipeline.generation.worker <request.json>``.

vLLM spawns engine processes and holds RAM (CPU) or GPU memory for its KV cache until its process exits,
so each generation stage runs in a process of its own. The caller gets every byte of memory back, and the
engine is created under ``__main__`` as vLLM requires.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import GenerationConfig


class GenerationError(RuntimeError):
    """The generation process failed."""


def run_generation(
    model_path: str,
    prompts: list[dict[str, Any]],
    config: GenerationConfig,
    *,
    model_label: str,
    trust_remote_code: bool = False,
    samples_per_prompt: int | None = None,
    temperature: float | None = None,
) -> list[dict[str, Any]]:
    """Generate in a child process and return the rows (``generations`` schema)."""
    with tempfile.TemporaryDirectory(prefix="bvpo-gen-") as tmp:
        request = Path(tmp) / "request.json"
        output = Path(tmp) / "generations.parquet"
        request.write_text(
            json.dumps(
                {
                    "model_path": model_path,
                    "model_label": model_label,
                    "trust_remote_code": trust_remote_code,
                    "config": config.model_dump(mode="json"),
                    "prompts": [{"prompt_id": p["prompt_id"], "prompt": p["prompt"]} for p in prompts],
                    "samples_per_prompt": samples_per_prompt,
                    "temperature": temperature,
                    "output": str(output),
                }
            ),
            encoding="utf-8",
        )
        env = dict(os.environ)
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.generation.worker", str(request)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        if proc.returncode != 0 or not output.exists():
            tail = "\n".join(proc.stdout.splitlines()[-25:])
            raise GenerationError(f"vLLM generation failed (exit code {proc.returncode}):\n{tail}")
        return pq.read_table(output).to_pylist()


def _main(request_path: str) -> None:
    from pipeline.generation.engine import open_vllm_engine
    from pipeline.generation.sampler import generate_responses

    request = json.loads(Path(request_path).read_text(encoding="utf-8"))
    config = GenerationConfig.model_validate(request["config"])
    with open_vllm_engine(request["model_path"], config, request["trust_remote_code"]) as engine:
        rows = generate_responses(
            engine,
            request["prompts"],
            config,
            request["model_label"],
            samples_per_prompt=request["samples_per_prompt"],
            temperature=request["temperature"],
        )
    out = Path(request["output"])
    tmp = out.with_suffix(".partial")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.rename(out)


if __name__ == "__main__":
    _main(sys.argv[1])
