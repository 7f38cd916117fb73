"""Checks that fail fast, naming the offending folder or setting, before a stage spends minutes on it.

A model folder without weights or a tokenizer, or a tokenizer whose chat template cannot render the
configured reasoning modes, would otherwise fail deep inside vLLM after its engine start (or, worse for the
template, silently produce reasoning-off samples that still think). These checks run on the CPU in
milliseconds and never load weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import ReasoningConfig
from pipeline.generation.reasoning import TraceFormat
from pipeline.model_assets import ModelAssetError

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
_LOCAL_PREFIXES = ("/", "./", "../", "~")


class TraceFormatError(ValueError):
    """The tokenizer's chat template cannot render the configured reasoning on/off modes."""


def check_model_dir(name_or_path: str) -> None:
    """Raise :class:`ModelAssetError` when a local model folder lacks its config, weights or tokenizer.

    A name that is not an existing folder and does not look like a local path (``/``, ``./``, ``~``) is
    taken as a Hugging Face hub id and left to ``from_pretrained``.
    """
    folder = Path(name_or_path).expanduser()
    if not folder.exists():
        if name_or_path.startswith(_LOCAL_PREFIXES):
            raise ModelAssetError(f"model path {name_or_path} does not exist")
        return
    if not folder.is_dir():
        raise ModelAssetError(f"model path {name_or_path} is a file, not a Hugging Face checkpoint folder")
    if not (folder / "config.json").is_file():
        raise ModelAssetError(f"model folder {folder} has no config.json (not a Hugging Face checkpoint)")
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise ModelAssetError(
            f"model folder {folder} holds no weights (no *.safetensors or pytorch_model*.bin file)"
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES) and not next(
        folder.glob("*.tiktoken"), None
    ):
        raise ModelAssetError(
            f"model folder {folder} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})"
        )


def _check_single_bos(tokenizer: Any, fmt: TraceFormat, model: str) -> None:
    """Raise when the rendered prompt ids start with two BOS tokens.

    Prompts are rendered by the chat template and tokenized with no special tokens added (the template's
    own BOS, if it writes one, is the only one: docs/method.md §Token-exact sequences), so a double BOS can
    only come from the template itself, and the model would be sampled and trained on a prompt it never saw.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return
    ids = fmt.prompt_ids(tokenizer, "bvpo template probe", "trace")
    if len(ids) >= 2 and ids[0] == ids[1] == bos:
        raise TraceFormatError(
            f"the chat template of {model} renders a prompt that starts with two BOS tokens "
            f"({tokenizer.convert_ids_to_tokens(bos)!r} twice): fix the template (write BOS once)"
        )


def check_chat_template(tokenizer: Any, reasoning: ReasoningConfig, model: str) -> None:
    """Raise :class:`TraceFormatError` when ``tokenizer`` cannot render both reasoning modes as configured.

    Every tokenizer needs a chat template. With ``reasoning.control: native`` the template must also write
    the configured close tag when ``enable_thinking=False`` (the empty trace block); if it ignores the flag
    or writes other tags, reasoning-off samples would silently be reasoning-on ones.
    """
    if getattr(tokenizer, "chat_template", "") is None:
        raise TraceFormatError(
            f"the tokenizer of {model} has no chat template (tokenizer.chat_template is not set): "
            "use a chat/instruct model, or add a chat_template to its tokenizer_config.json"
        )
    fmt = TraceFormat(reasoning)
    _check_single_bos(tokenizer, fmt, model)
    if reasoning.control != "native":
        rendered = fmt.render_prompt(tokenizer, "bvpo template probe", "trace")
        if rendered.rstrip().endswith(reasoning.open_tag):
            raise TraceFormatError(
                f"the chat template of {model} already opens the trace: its generation prompt ends with "
                f"{reasoning.open_tag!r}, so reasoning.control 'prefill' would write the tag twice; use a "
                "template revision without it (or one that takes enable_thinking, with control 'native')"
            )
        return
    probe = "bvpo template probe"
    on = fmt.render_prompt(tokenizer, probe, "trace")
    off = fmt.render_prompt(tokenizer, probe, "empty")
    if on == off:
        raise TraceFormatError(
            f"generation.reasoning.control is 'native' but the chat template of {model} ignores "
            "enable_thinking (both modes render the same prompt): use reasoning.control 'prefill'"
        )
    tail = off[off.rfind(probe) + len(probe) :]
    if reasoning.close_tag not in tail:
        raise TraceFormatError(
            f"generation.reasoning.control is 'native' but the chat template of {model} never writes "
            f"reasoning.close_tag {reasoning.close_tag!r} when enable_thinking=False: set "
            "reasoning.open_tag/close_tag to the template's tags, or use reasoning.control 'prefill'"
        )


class ServedModelError(ValueError):
    """A served engine serves another model than the config's ``model.name_or_path``."""


def _same_model(name: str, configured: str) -> bool:
    a, b = name.rstrip("/"), configured.rstrip("/")
    return a == b or Path(a).name == Path(b).name


def check_served_model(models: list[dict[str, Any]], configured: str, served_model: str | None) -> None:
    """Raise :class:`ServedModelError` unless the served model (``served_model``, else the first entry of
    the server's ``/models``) is ``configured`` (``model.name_or_path``): by its id or, for an alias
    (``--served-model-name``), the ``root`` vLLM reports; a local folder matches by its last component.

    Otherwise the prompts would be rendered and the pairs trained with one model's tokenizer and
    template while another model samples them.
    """
    ids = [str(m.get("id")) for m in models]
    chosen = next((m for m in models if m.get("id") == served_model), None) if served_model else None
    if served_model and chosen is None:
        raise ServedModelError(f"generation.served_model {served_model!r} is not served (serving: {ids})")
    entry = chosen or (models[0] if models else None)
    if entry is None:
        raise ServedModelError("the server's /models lists no model")
    names = list(dict.fromkeys(str(entry[k]) for k in ("id", "root") if entry.get(k)))
    if not any(_same_model(name, configured) for name in names):
        raise ServedModelError(
            f"the server serves {' / '.join(names)}, but model.name_or_path is {configured!r}: the pipeline "
            "would render and train with one model while another samples; serve the configured model "
            "(e.g. VLLM_MODEL in docker-compose) or set model.name_or_path to the served one"
        )
