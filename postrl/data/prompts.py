"""Prompt rendering: Sample -> chat messages -> token ids."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

DEFAULT_PROMPT_TEMPLATE = "{question}"


def build_messages(sample: Any, system_prompt: Optional[str] = None, prompt_template: str = DEFAULT_PROMPT_TEMPLATE) -> list[dict]:
    """Chat messages for ``sample``.

    ``prompt_template`` is formatted with ``question=sample.question`` only (the answer is not
    exposed, to avoid leaking the ground truth). Literal braces in the template must be doubled.
    A system message is added only when ``system_prompt`` is not None.
    """
    question = sample.question if hasattr(sample, "question") else str(sample)
    if "{question}" not in prompt_template:
        raise ValueError(f"prompt_template must contain the '{{question}}' placeholder, got {prompt_template!r}")
    try:
        user = prompt_template.format(question=question)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"bad prompt_template {prompt_template!r}: only the '{{question}}' placeholder is supported "
            f"(double literal braces as '{{{{' / '}}}}'): {e!r}"
        ) from e
    messages: list[dict] = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": user})
    return messages


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _to_id_list(out: Any) -> list[int]:
    if isinstance(out, Mapping) or hasattr(out, "input_ids") and not isinstance(out, (list, tuple)):
        out = out["input_ids"]
    if hasattr(out, "tolist"):  # torch / numpy
        out = out.tolist()
    out = list(out)
    if out and isinstance(out[0], (list, tuple)):  # batched shape [1, T]
        if len(out) != 1:
            raise ValueError(f"expected a single sequence from the tokenizer, got a batch of {len(out)}")
        out = list(out[0])
    return [int(t) for t in out]


def render_plain(messages: list[dict]) -> str:
    """Plain-text fallback: ``"{system}\\n\\n{user}\\n"`` (system part omitted when absent).

    Multiple non-system messages are joined with blank lines.
    """
    system = [m["content"] for m in messages if m.get("role") == "system"]
    rest = [m["content"] for m in messages if m.get("role") != "system"]
    return "\n\n".join(system + ["\n\n".join(rest)]) + "\n"


def render_prompt(tokenizer: Any, messages: list[dict], use_chat_template: bool = True) -> list[int]:
    """Token ids of the prompt (ending with the assistant generation prompt when a chat template is used).

    With a chat template (and ``use_chat_template``): ``tokenizer.apply_chat_template(messages,
    add_generation_prompt=True, tokenize=True)`` (list or BatchEncoding/dict are both handled).
    Otherwise: ``tokenizer(render_plain(messages), add_special_tokens=True)["input_ids"]``.
    """
    if use_chat_template and has_chat_template(tokenizer):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return _to_id_list(out)
    text = render_plain(messages)
    return _to_id_list(tokenizer(text, add_special_tokens=True)["input_ids"])


def render_prompt_text(tokenizer: Any, messages: list[dict], use_chat_template: bool = True) -> str:
    """The prompt as a string (for logging / engines that take text)."""
    if use_chat_template and has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return render_plain(messages)
