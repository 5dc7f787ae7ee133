"""The ``data`` section's keys for task mixtures, prompt samplers and guidance (docs/curricula.md).

::

    data:
      mixture:                        # several sources in one run, each with its own scorer
        - {name: easy, source: toy, task: copy, task_kwargs: {length: 1}, weight: 1}
        - {name: hard, source: reasoning_gym, task: basic_arithmetic, task_kwargs: {max_digits: 3}, weight: 2}
      sampler: {name: learnability, ema: 0.5}     # which prompts come next (keys besides name -> kwargs)
      guidance: {name: prefix_hint, field: solution, start: 0.5, end: 0.0, decay_steps: 200}

The sampler and guidance names are checked here; their keyword arguments are checked when the trainer
builds them (``postrl.data.samplers.build_sampler``, ``postrl.data.guidance.build_guidance``), before any
model is loaded, with the valid keys and their defaults in the message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .checks import ConfigTree, Problems

SAMPLER_NAMES = ("uniform", "difficulty_filter", "learnability", "speed", "dump", "mopps", "rg_curriculum")
"""Registered prompt samplers (``postrl.data.samplers.SAMPLERS``; a test keeps the two in step)."""
GUIDANCE_NAMES = ("none", "prefix_hint", "guide", "luffy")
"""Guidance methods (``postrl.data.guidance.GUIDANCE``; ``none`` = off)."""
MIXTURE_SOURCES = ("reasoning_gym", "jsonl", "toy")


@dataclass
class MixtureEntry:
    """One source of a task mixture: its prompts, its scorer and its share of the prompts."""

    name: str = ""
    """Task name in metrics (``reward/task/<name>``) and in each sample's ``metadata["task_name"]``;
    empty = ``task`` (the file name for jsonl). Must be unique within the mixture."""
    source: str = "reasoning_gym"
    """reasoning_gym | jsonl | toy."""
    task: str = "basic_arithmetic"
    """reasoning_gym or toy task name; ignored for jsonl."""
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    """The task generator's keyword arguments (as ``data.task_kwargs``)."""
    path: str | None = None
    """jsonl training file (required when source is jsonl)."""
    eval_path: str | None = None
    """jsonl held-out file; None = a held-out split of ``path``."""
    weight: float = 1.0
    """Relative share of this task's prompts under the uniform sampler (> 0)."""
    train_size: int = 0
    """Training examples of this task; 0 = ``data.train_size``."""
    eval_size: int = -1
    """Held-out examples of this task; -1 = ``data.eval_size``."""
    answer_extraction: str = ""
    """raw | answer_tag | boxed | last_number; empty = ``data.answer_extraction``."""

    def label(self) -> str:
        """The task's name: ``name``, else the task (jsonl: the file's stem)."""
        if self.name:
            return self.name
        if self.source == "jsonl" and self.path:
            base = str(self.path).replace("\\", "/").rsplit("/", 1)[-1]
            return base.rsplit(".", 1)[0] if "." in base else base
        return self.task

    def validate(self, p: Problems, key: str, extractions: tuple[str, ...]) -> None:
        p.choice(f"{key}.source", self.source, MIXTURE_SOURCES)
        if self.source == "jsonl" and not self.path:
            p.add(f"{key}.source='jsonl' requires {key}.path (a .jsonl training file).")
        p.check(math.isfinite(self.weight) and self.weight > 0, f"{key}.weight", self.weight, "must be > 0")
        p.at_least(f"{key}.train_size", self.train_size, 0, " (0 = data.train_size)")
        p.at_least(f"{key}.eval_size", self.eval_size, -1, " (-1 = data.eval_size)")
        if self.answer_extraction:
            p.choice(f"{key}.answer_extraction", self.answer_extraction, extractions)
        name = self.label()
        p.check(bool(name) and "/" not in name and not any(c.isspace() for c in name), f"{key}.name", name,
                "must be a non-empty name without '/' or spaces (it becomes part of metric names)")


@dataclass
class SamplerSpec:
    """Which training prompts come next (``postrl.data.samplers``)."""

    name: str = "uniform"
    """uniform | difficulty_filter | learnability | speed | dump | mopps | rg_curriculum (docs/curricula.md)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """The sampler's parameters; keys written next to ``name`` in YAML are put here."""

    _extra_keys_into: ClassVar[str] = "kwargs"


@dataclass
class GuidanceSpec:
    """Guidance for prompts the model cannot solve yet (``postrl.data.guidance``)."""

    name: str = "none"
    """none | prefix_hint (QuestA) | guide (Guide-GRPO) | luffy (LUFFY) (docs/curricula.md)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """The method's parameters; keys written next to ``name`` in YAML are put here."""

    _extra_keys_into: ClassVar[str] = "kwargs"


def validate_selection(p: Problems, data: Any, cfg: ConfigTree, extractions: tuple[str, ...]) -> None:
    """The mixture entries, the sampler and guidance names, and the combinations the trainer cannot run."""
    labels = []
    for i, entry in enumerate(data.mixture):
        entry.validate(p, f"data.mixture.{i}", extractions)
        labels.append(entry.label())
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        p.add(f"data.mixture: task names {', '.join(repeated)} occur more than once; give each entry its own "
              "'name'.")
    if data.mixture:
        set_here = [k for k, default in (("source", "reasoning_gym"), ("task", "basic_arithmetic"), ("path", None),
                                         ("eval_path", None)) if getattr(data, k) != default]
        set_here += ["task_kwargs"] if data.task_kwargs else []
        if set_here:
            p.add(f"data.mixture replaces data.{', data.'.join(set_here)}: set them in each mixture entry "
                  "instead (they would be ignored).")
    sampler, guidance = data.sampler.name, data.guidance.name
    p.choice("data.sampler.name", sampler, SAMPLER_NAMES)
    p.choice("data.guidance.name", guidance, GUIDANCE_NAMES)
    train, algo, env = getattr(cfg, "train", None), getattr(cfg, "algo", None), getattr(cfg, "env", None)
    if sampler != "uniform" and getattr(train, "strategy", "none") != "none":
        p.add(f"data.sampler.name={sampler} keeps per-prompt statistics in one process; it runs with "
              "train.strategy=none only (use the uniform sampler with ddp/fsdp).")
    if guidance != "none" and getattr(train, "strategy", "none") != "none":
        p.add(f"data.guidance.name={guidance} runs with train.strategy=none only for now.")
    multi_turn = bool(getattr(env, "name", ""))
    if multi_turn and (sampler == "speed" or guidance != "none"):
        what = "data.sampler.name=speed" if sampler == "speed" else f"data.guidance.name={guidance}"
        p.add(f"{what} is for single-turn training; it is not wired for multi-turn environments (env.name).")
    if sampler == "speed" and getattr(algo, "dynamic_sampling", False):
        p.add("data.sampler.name=speed already drops groups whose screening rollouts all score the same; "
              "turn algo.dynamic_sampling off (it would drop them a second time).")
    if guidance in ("guide", "luffy") and getattr(algo, "dynamic_sampling", False):
        p.add(f"data.guidance.name={guidance} rebuilds the step's groups itself; it does not run together with "
              "algo.dynamic_sampling yet (turn one off).")
    if algo is not None and algo.advantage == "remax" and (sampler == "speed" or guidance in ("guide", "luffy")):
        what = "data.sampler.name=speed" if sampler == "speed" else f"data.guidance.name={guidance}"
        p.add(f"{what} assembles groups from several generations; algo.advantage=remax needs one greedy baseline "
              "per prompt of a single generation. Use another estimator.")
    if algo is not None and guidance == "luffy" and algo.tis_mode != "off":
        p.add("data.guidance.name=luffy trains on teacher traces whose behaviour log-probs are 0 (the teacher's "
              "probability is taken as 1); algo.tis_mode would weight them by exp(log-prob): set it to off.")
