"""An audit log of engine I/O: every token-id prompt sent and the token ids the engine returned for it.

Set ``BVPO_ENGINE_LOG=<file>`` and each engine (in-process vLLM, in its child process too, and the HTTP
engine) appends one JSON line per request: ``{"prompt": [ids], "outputs": [[ids], ...]}``, written from the
engine's own output objects before this project converts them. It lets anyone check that the sequences
training scores are exactly what the engine produced (docs/method.md §Token-exact sequences); the
token-exactness test uses it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence

ENV_VAR = "BVPO_ENGINE_LOG"
_lock = threading.Lock()


def log_request(prompt: Sequence[int], outputs: Sequence[Sequence[int]]) -> None:
    """Append one request to the log named by ``$BVPO_ENGINE_LOG`` (nothing when it is unset)."""
    path = os.environ.get(ENV_VAR)
    if not path:
        return
    line = json.dumps({"prompt": [int(t) for t in prompt], "outputs": [[int(t) for t in o] for o in outputs]})
    with _lock, open(path, "a", encoding="utf-8") as out:
        out.write(line + "\n")


def read_log(path: str) -> dict[tuple[int, ...], list[list[int]]]:
    """The logged requests: prompt ids → the outputs' ids of every request with that prompt, in log order.

    Identical prompts are common (two samples whose short traces came out the same feed the same answer
    prompt), so the outputs of each are kept, not only the last one's.
    """
    requests: dict[tuple[int, ...], list[list[int]]] = {}
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            entry = json.loads(line)
            requests.setdefault(tuple(entry["prompt"]), []).extend(entry["outputs"])
    return requests
