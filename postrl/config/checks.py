"""The error type of configuration problems and the helper every section's ``validate`` writes into.

A section checks its own keys (and the rules that tie them to other sections) with one
:class:`Problems`; :func:`postrl.config.validate` runs every section and raises a single
:class:`ConfigError` listing everything that is wrong, so a user fixes a config in one go.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any


class ConfigError(ValueError):
    """A configuration is malformed (unknown key, wrong type) or inconsistent."""


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n``, ascending (the valid values listed by divisibility errors)."""
    return [d for d in range(1, n + 1) if n % d == 0]


class Problems:
    """The problems found in one config, as messages that name the dotted key and what would be valid.

    The ``check``-style methods return whether the value is fine, so a later rule that needs a sane
    value can be skipped when an earlier one already reported it.
    """

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        """Record a problem written out in full."""
        self.messages.append(message)

    def check(self, ok: bool, key: str, value: Any, requirement: str) -> bool:
        """``key=value: requirement.`` unless ``ok``."""
        if not ok:
            self.add(f"{key}={value!r}: {requirement}.")
        return ok

    def at_least(self, key: str, value: float, minimum: float, note: str = "") -> bool:
        """``value >= minimum``; ``note`` says what the bound means, e.g. ``" (0 = off)"``."""
        return self.check(value >= minimum, key, value, f"must be >= {minimum}{note}")

    def choice(self, key: str, value: str, choices: Sequence[str]) -> bool:
        """``value`` is one of ``choices`` (the error suggests the closest one)."""
        if value in choices:
            return True
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        self.add(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}.{hint}")
        return False

    def registered(self, registry: Any, name: str) -> Callable | None:
        """The function registered as ``name``, or None after recording the registry's own error
        (which names the config key, suggests a close name and lists the valid ones)."""
        try:
            return registry.get_fn(name)
        except KeyError as exc:
            self.add(exc.args[0])
            return None

    def micro_batch_divides(self, section: str, batch_size: int, micro_batch_size: int, unit: str) -> None:
        """``section.micro_batch_size`` (0 = the whole batch) divides ``section.batch_size``."""
        self.at_least(f"{section}.micro_batch_size", micro_batch_size, 0, f" (0 = {section}.batch_size)")
        if batch_size >= 1 and micro_batch_size >= 1 and batch_size % micro_batch_size:
            self.add(f"{section}.micro_batch_size={micro_batch_size} must divide {section}.batch_size={batch_size} "
                     f"({unit} per update). Valid values: {', '.join(map(str, divisors(batch_size)))}.")

    def raise_if_any(self, title: str = "Invalid config") -> None:
        """Raise one :class:`ConfigError` listing every problem, if there is any."""
        if self.messages:
            raise ConfigError(f"{title}:\n  - " + "\n  - ".join(self.messages))


ConfigTree = Any
"""The whole config (:class:`postrl.config.schema.Config`) as the sections' ``validate`` methods see it; an
alias, because ``schema`` imports the section modules and they cannot import it back."""
