"""The ``stages`` list of ``postrl pipeline``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .checks import Problems

STAGE_KINDS = ("sft", "dpo", "rm", "grpo", "rl")
STAGE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class StageSpec:
    """One stage of ``postrl pipeline``: a kind and the config changes for that stage."""

    kind: str = "sft"
    """sft | dpo | rm | grpo (= rl): which trainer runs the stage."""
    name: str = ""
    """Stage name used in its directory ``stages/NN-name``; empty = the kind."""
    config: dict[str, Any] = field(default_factory=dict)
    """Overrides merged into the pipeline's config for this stage: nested sections ({train: {lr: 1e-4}}) or
    dotted keys ({train.lr: 1e-4})."""

    @property
    def resolved_name(self) -> str:
        """The stage's name, or its kind when it has none."""
        return self.name or self.kind

    def validate(self, p: Problems, key: str) -> None:
        """Check this entry of the ``stages`` list, ``key`` = ``stages.N``. The stage's own config is
        merged and validated by postrl pipeline; the names' uniqueness by :func:`validate_stages`."""
        p.choice(f"{key}.kind", self.kind, STAGE_KINDS)
        p.check(bool(STAGE_NAME_PATTERN.match(self.resolved_name)), f"{key}.name", self.resolved_name,
                "must be letters, digits, '_', '-' or '.' (it names the stage directory)")
        p.check("stages" not in self.config, f"{key}.config", "{stages: ...}", "a stage cannot contain stages")


def validate_stages(p: Problems, stages: list[StageSpec]) -> None:
    """Every stage, and that no two stages share a name (each names a directory)."""
    for i, stage in enumerate(stages):
        stage.validate(p, f"stages.{i}")
    names = [stage.resolved_name for stage in stages]
    for name in sorted({n for n in names if names.count(n) > 1}):
        p.add(f"stages: the name {name!r} is used by more than one stage; give each a distinct 'name'.")
