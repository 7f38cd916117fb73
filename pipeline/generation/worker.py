"""Run vLLM generation in a child process: ``python -m pipeline.generation.worker <request.json>``.

vLLM spawns engine processes and holds RAM (CPU) or GPU memory for its KV cache until its process exits,
so each generation stage runs in a process of its own (and session, so the engine processes can be ended
together). The caller gets every byte of memory back, and the engine is created under ``__main__`` as vLLM
requires. One engine serves all shards of a request; after each shard is persisted the child reports a
line ``@@bvpo-gen {json}`` on its output; everything else it writes (vLLM's progress bar included) is
passed through to the caller's stderr.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from pipeline.config import GenerationConfig
from pipeline.generation.shards import Shard, ShardStore

EVENT_PREFIX = "@@bvpo-gen "
_LINE_END = re.compile(r"[\r\n]")

EventHandler = Callable[[dict[str, Any]], None]


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
    """Generate for all prompts as one shard in a child process; the rows (``generations`` schema)."""
    shard = Shard(index=0, seed=config.seed, prompts=tuple(prompts))
    with tempfile.TemporaryDirectory(prefix="bvpo-gen-") as tmp:
        run_shards_in_child(
            model_path,
            [shard],
            config,
            staging_dir=Path(tmp),
            model_label=model_label,
            trust_remote_code=trust_remote_code,
            samples_per_prompt=samples_per_prompt,
            temperature=temperature,
        )
        rows = ShardStore(Path(tmp)).read(0)
    if rows is None:
        raise GenerationError("the generation process exited without writing its output")
    return rows


def run_shards_in_child(
    model_path: str,
    shards: Sequence[Shard],
    config: GenerationConfig,
    *,
    staging_dir: Path,
    model_label: str,
    trust_remote_code: bool = False,
    samples_per_prompt: int | None = None,
    temperature: float | None = None,
    on_event: EventHandler | None = None,
    echo: bool = True,
) -> None:
    """Generate ``shards`` with one engine in a child process, each persisted in ``staging_dir``.

    ``on_event`` gets each event the child reports (``engine_ready``, ``shard_done``), in this thread; if
    it raises, the child and its engine processes are killed and the exception propagates (finished
    shards stay on disk). ``echo``: pass the child's output (vLLM's progress bar) through to stderr.
    """
    with tempfile.TemporaryDirectory(prefix="bvpo-gen-request-") as tmp:
        request = Path(tmp) / "request.json"
        request.write_text(
            json.dumps(
                {
                    "model_path": model_path,
                    "model_label": model_label,
                    "trust_remote_code": trust_remote_code,
                    "config": config.model_dump(mode="json"),
                    "launched_at": time.time(),  # engine start is timed from the child's launch
                    "shards": [
                        {
                            "index": s.index,
                            "seed": s.seed,
                            "prompts": [
                                {"prompt_id": p["prompt_id"], "prompt": p["prompt"]} for p in s.prompts
                            ],
                        }
                        for s in shards
                    ],
                    "samples_per_prompt": samples_per_prompt,
                    "temperature": temperature,
                    "staging_dir": str(staging_dir),
                }
            ),
            encoding="utf-8",
        )
        env = dict(os.environ)
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.generation.worker", str(request)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        output = ChildOutput(sys.stderr if echo else None)
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        try:
            for chunk in iter(lambda: os.read(fd, 65536), b""):
                for event in output.feed(chunk):
                    if on_event is not None:
                        on_event(event)
            code = proc.wait()
        finally:  # on failure the child is killed; either way its engine processes are ended
            _kill_session(proc)
            proc.stdout.close()
    if code != 0:
        raise GenerationError(f"vLLM generation failed (exit code {code}):\n{output.tail_text()}")


def _kill_session(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    else:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


class ChildOutput:
    """Splits the child's output into event lines (parsed) and the rest (echoed, last lines kept)."""

    def __init__(self, echo: TextIO | None, tail_lines: int = 40) -> None:
        self.echo = echo
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._tail: deque[tuple[str, str]] = deque(maxlen=tail_lines)

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        """Events completed by ``chunk``."""
        self._buffer += self._decoder.decode(chunk)
        events: list[dict[str, Any]] = []
        while (match := _LINE_END.search(self._buffer)) is not None:
            line, end = self._buffer[: match.start()], match.group()
            self._buffer = self._buffer[match.end() :]
            start = line.find(EVENT_PREFIX)
            if start >= 0:
                with contextlib.suppress(json.JSONDecodeError):
                    events.append(json.loads(line[start + len(EVENT_PREFIX) :]))
                line, end = line[:start], ""
            self._keep(line, end)
        return events

    def _keep(self, line: str, end: str) -> None:
        if self.echo is not None and (line or end):
            self.echo.write(line + end)
            self.echo.flush()
        if not line.strip():
            return
        if self._tail and self._tail[-1][1] == "\r":  # a progress bar redraws its line: keep the last one
            self._tail.pop()
        self._tail.append((line, end))

    def tail_text(self) -> str:
        return "\n".join(line for line, _ in [*self._tail, (self._buffer, "")] if line.strip())


def _emit(event: dict[str, Any]) -> None:
    print(f"\n{EVENT_PREFIX}{json.dumps(event)}", flush=True)


def _main(request_path: str) -> None:
    entered = time.time()
    from pipeline.generation.engine import open_vllm_engine
    from pipeline.generation.runner import run_shards

    request = json.loads(Path(request_path).read_text(encoding="utf-8"))
    config = GenerationConfig.model_validate(request["config"])
    shards = [Shard(index=s["index"], seed=s["seed"], prompts=tuple(s["prompts"])) for s in request["shards"]]
    launched = float(request.get("launched_at") or entered)
    imported = time.time()
    with open_vllm_engine(request["model_path"], config, request["trust_remote_code"]) as engine:
        ready = time.time()
        _emit(
            {
                "event": "engine_ready",
                "seconds": ready - launched,  # from the child's launch: interpreter, imports, engine
                "phases": {
                    "interpreter_and_worker_import_s": entered - launched,
                    "pipeline_import_s": imported - entered,
                    "engine_s": ready - imported,  # vLLM's import and LLM(...)
                },
                "pid": os.getpid(),
            }
        )
        run_shards(
            engine,
            shards,
            config,
            ShardStore(Path(request["staging_dir"])),
            model_label=request["model_label"],
            samples_per_prompt=request["samples_per_prompt"],
            temperature=request["temperature"],
            emit=_emit,
        )


if __name__ == "__main__":
    _main(sys.argv[1])
