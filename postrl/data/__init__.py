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
from . import curriculum as _curriculum  # noqa: F401  (registers the rg_curriculum sampler)

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
    """The prompt source of a config's ``data`` section (train and held-out splits, seeded by the data seed);
    with ``data.mixture``, a :class:`MixtureSource` of one source per entry (every entry seeded by the data
    seed)."""
    d = cfg.data
    common = dict(train_size=d.train_size, eval_size=d.eval_size, seed=cfg.resolved_data_seed,
                  answer_extraction=d.answer_extraction)
    if d.mixture:
        from .mixture import MixtureSource

        parts = []
        for e in d.mixture:
            kw = dict(common, train_size=e.train_size or d.train_size,
                      eval_size=d.eval_size if e.eval_size < 0 else e.eval_size,
                      answer_extraction=e.answer_extraction or d.answer_extraction)
            if e.source in ("reasoning_gym", "toy"):
                src = build_source(e.source, task=e.task, task_kwargs=dict(e.task_kwargs), **kw)
            else:
                src = build_source(e.source, path=e.path, eval_path=e.eval_path, **kw)
            parts.append((e.label(), e.weight, src))
        return MixtureSource(parts, answer_extraction=d.answer_extraction)
    if d.source in ("reasoning_gym", "toy"):
        return build_source(d.source, task=d.task, task_kwargs=dict(d.task_kwargs), **common)
    return build_source(d.source, path=d.path, eval_path=d.eval_path, **common)
