"""Prompt-source layer: samples, sources (reasoning-gym / JSONL / toy), answer extraction, prompt rendering."""

from .answers import ANSWER_MODES, extract_answer
from .prompts import DEFAULT_PROMPT_TEMPLATE, build_messages, has_chat_template, render_plain, render_prompt, render_prompt_text
from .sampler import PromptSampler
from .sources import (
    SOURCES,
    DataError,
    JsonlSource,
    PromptSource,
    ReasoningGymSource,
    Sample,
    build_source,
    math_verify_score,
)
from .toy import TOY_TASKS, ToySource

__all__ = [
    "ANSWER_MODES",
    "DEFAULT_PROMPT_TEMPLATE",
    "SOURCES",
    "DataError",
    "JsonlSource",
    "PromptSampler",
    "PromptSource",
    "ReasoningGymSource",
    "Sample",
    "TOY_TASKS",
    "ToySource",
    "build_messages",
    "build_source",
    "extract_answer",
    "has_chat_template",
    "math_verify_score",
    "render_plain",
    "render_prompt",
    "render_prompt_text",
]
