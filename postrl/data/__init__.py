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
    "build_data_source",
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


def build_data_source(cfg):
    """The prompt source of a config's ``data`` section (train and held-out splits, seeded by the data seed)."""
    d = cfg.data
    common = dict(train_size=d.train_size, eval_size=d.eval_size, seed=cfg.resolved_data_seed,
                  answer_extraction=d.answer_extraction)
    if d.source in ("reasoning_gym", "toy"):
        return build_source(d.source, task=d.task, task_kwargs=dict(d.task_kwargs), **common)
    return build_source(d.source, path=d.path, eval_path=d.eval_path, **common)
