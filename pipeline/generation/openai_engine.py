"""The HTTP engine: a served vLLM (or another OpenAI-compatible server) through ``/completions``.

Token in, token out (docs/method.md §Token-exact sequences): the prompt is sent as token ids (vLLM's server
accepts a list of ints as ``prompt``), exactly what the in-process engine gets, so the two-pass trace-budget
logic of :mod:`pipeline.generation.sampler` runs unchanged. vLLM's ``return_token_ids`` extension gives the
sampled ids and ``logprobs: 0`` the log-prob of each; ``include_stop_str_in_output`` keeps the close tag's
tokens in the text. A server that returns no token ids is refused (its tokens would have to be guessed from
text). Requests run ``concurrency`` at a time (the server batches them) through the shared
:class:`pipeline.http_client.JsonClient`: timeouts, connection errors, 429 and 5xx answers are retried with
exponential backoff (``Retry-After`` honoured); other 4xx answers fail at once.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tqdm.auto import tqdm

from pipeline.config import GenerationConfig
from pipeline.generation.engine import Completion, SamplingSpec
from pipeline.generation.engine_log import log_request
from pipeline.http_client import EndpointClient, EndpointError
from pipeline.http_client import api_key_from_env as _key_from_env


def api_key_from_env(name: str | None) -> str | None:
    """The key held by environment variable ``name``; a named but unset variable is an error."""
    return _key_from_env(name, "generation.api_key_env")


class OpenAICompletionsEngine(EndpointClient):
    """``complete`` over HTTP, with the tokenizer of the served model for rendering and counting."""

    name = "openai"
    concurrency = 32  # connection defaults of EndpointClient: a served engine batches many requests
    timeout_s = 600.0
    max_retries = 3
    backoff_s = 1.0

    def __init__(self, base_url: str, tokenizer: Any, *, model: str | None = None, **connection: Any) -> None:
        """``connection``: ``api_key``, ``concurrency``, ``timeout_s``, ``max_retries``, ``backoff_s``,
        ``progress``, ``transport`` (:class:`~pipeline.http_client.EndpointClient`)."""
        super().__init__(base_url, **connection)
        self._tokenizer = tokenizer
        self._model = model

    @classmethod
    def from_config(cls, config: GenerationConfig, tokenizer: Any) -> OpenAICompletionsEngine:
        return cls(
            config.base_url,
            tokenizer,
            model=config.served_model,
            api_key=api_key_from_env(config.api_key_env),
            concurrency=config.concurrency,
            timeout_s=config.request_timeout_s,
            max_retries=config.max_retries,
        )

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def model(self) -> str:
        """The served model name (asked from ``/models`` once when not configured)."""
        if self._model is None:
            body = self._request("GET", "/models", None)
            try:
                self._model = str(body["data"][0]["id"])
            except (KeyError, IndexError, TypeError) as exc:
                raise EndpointError(f"{self.base_url}/models lists no model: {str(body)[:300]}") from exc
        return self._model

    def served_models(self) -> list[dict[str, Any]]:
        """The entries of the server's ``/models`` (``id``; vLLM adds ``root``, the model it loaded)."""
        body = self._request("GET", "/models", None)
        data = body.get("data") if isinstance(body, dict) else None
        return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []

    def reseed(self, seed: int) -> int | None:
        """A served engine is seeded by whoever started it: nothing to do, no seed to record."""
        return None

    def complete(self, prompts: list[list[int]], specs: list[SamplingSpec]) -> list[list[Completion]]:
        """One list of ``spec.n`` completions per token-id prompt, in order (requests run concurrently)."""
        if len(prompts) != len(specs):
            raise ValueError(f"{len(prompts)} prompts but {len(specs)} sampling specs")
        model = self.model
        results: list[list[Completion]] = [[] for _ in prompts]
        tokens = 0
        started = time.perf_counter()
        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            with tqdm(total=len(prompts), desc="completions", unit="req", disable=not self.progress) as bar:
                futures = [
                    pool.submit(self._complete_one, model, p, s) for p, s in zip(prompts, specs, strict=True)
                ]
                for index, future in enumerate(futures):
                    results[index] = future.result()
                    tokens += sum(c.token_count for c in results[index])
                    bar.set_postfix_str(f"{tokens / max(time.perf_counter() - started, 1e-9):.1f} tokens/s")
                    bar.update(1)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after a failure, queued requests are not sent
        return results

    def _complete_one(self, model: str, prompt: list[int], spec: SamplingSpec) -> list[Completion]:
        payload: dict[str, Any] = {
            "model": model,
            "prompt": list(prompt),
            "n": spec.n,
            "temperature": spec.temperature,
            "top_p": spec.top_p if spec.temperature > 0 else 1.0,
            "max_tokens": spec.max_tokens,
            "return_token_ids": True,
            "logprobs": 0,
            "include_stop_str_in_output": True,
        }
        if spec.stop:
            payload["stop"] = list(spec.stop)
        body = self._request("POST", "/completions", payload)
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or len(choices) != spec.n:
            raise EndpointError(
                f"{self.base_url}/completions returned {len(choices) if isinstance(choices, list) else 'no'} "
                f"choice(s) for n={spec.n}: {str(body)[:300]}"
            )
        ordered = sorted(choices, key=lambda c: int(c.get("index", 0)))
        completions = [self._completion(c) for c in ordered]
        log_request(prompt, [c.get("token_ids") or [] for c in ordered])
        return completions

    def _completion(self, choice: dict[str, Any]) -> Completion:
        text = choice.get("text")
        if not isinstance(text, str):
            raise EndpointError(f"a completion choice has no text: {str(choice)[:300]}")
        token_ids = choice.get("token_ids")
        if not isinstance(token_ids, list) or not all(isinstance(t, int) for t in token_ids):
            raise EndpointError(
                f"{self.base_url}/completions returned no token ids (vLLM's return_token_ids): training "
                f"needs the exact sampled ids, so only a vLLM server is supported: {str(choice)[:300]}"
            )
        logprobs = None
        token_logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
        if isinstance(token_logprobs, list) and len(token_logprobs) == len(token_ids):
            logprobs = tuple(float("nan") if v is None else float(v) for v in token_logprobs)
        stop_reason = choice.get("stop_reason")
        return Completion(
            text=text,
            token_ids=tuple(token_ids),
            finish_reason=str(choice.get("finish_reason") or "stop"),
            stop_reason=stop_reason if isinstance(stop_reason, str) else None,
            logprobs=logprobs,
        )
