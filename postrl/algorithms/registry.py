"""Name -> function registries, so a recipe chooses a method by name.

A new method is one decorated pure function::

    @register_advantage("my_adv")
    def my_adv(rewards, mask, group_size, cfg, **optional_inputs) -> Tensor:  # [B] ... -> [B, T]
        ...
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


class Registry(dict):
    """A dict of named functions whose lookup errors list the valid names."""

    def __init__(self, kind: str, config_key: str):
        super().__init__()
        self.kind = kind
        self.config_key = config_key

    def register(self, name: str) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self[name] = fn
            return fn

        return deco

    def get_fn(self, name: str) -> Callable:
        if name not in self:
            close = difflib.get_close_matches(name, list(self), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise KeyError(
                f"Unknown {self.kind} {name!r} for {self.config_key}.{hint} Valid: {', '.join(sorted(self))}."
            )
        return self[name]


ADVANTAGES = Registry("advantage estimator", "algo.advantage")
POLICY_LOSSES = Registry("policy loss", "algo.policy_loss")
LOSS_AGGREGATIONS = Registry("loss aggregation", "algo.loss_agg")
KL_ESTIMATORS = Registry("KL estimator", "algo.kl_estimator")

register_advantage = ADVANTAGES.register
register_policy_loss = POLICY_LOSSES.register
register_loss_agg = LOSS_AGGREGATIONS.register
register_kl_estimator = KL_ESTIMATORS.register
