"""Live progress bar: step, reward, accuracy, KL, entropy, response length, tokens/s."""

from __future__ import annotations

import shutil
import sys
from typing import Any

from tqdm.auto import tqdm


class Progress:
    """A tqdm bar over training steps whose postfix shows the latest metrics.

    When stderr is not a terminal (CI logs, pipes), one plain line per step is
    printed instead. ``run.progress: false`` prints nothing.
    """

    FIELDS = (("reward", "reward_mean", "{:.3f}"), ("acc", "accuracy", "{:.2f}"), ("kl", "kl", "{:.4f}"),
              ("kl_ref", "kl_ref", "{:.4f}"), ("ent", "entropy", "{:.2f}"), ("len", "response_len_mean", "{:.1f}"),
              ("tok/s", "tokens_per_s", "{:.0f}"))

    def __init__(self, total: int, initial: int = 0, enabled: bool = True,
                 fields: tuple[tuple[str, str, str], ...] | None = None):
        if fields is not None:
            self.FIELDS = fields
        self.live = enabled and sys.stderr.isatty()
        self.enabled = enabled
        # a pseudo-terminal may report a 0 x 0 size, which makes tqdm hide its bar: fall back to 120 x 24
        cols, rows = shutil.get_terminal_size((120, 24))
        self.bar = (tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr,
                         ncols=cols or 120, nrows=rows or 24, mininterval=0)
                    if self.live else None)
        self.total = total

    def format(self, record: dict[str, Any]) -> dict[str, str]:
        out = {label: fmt.format(record[key]) for label, key, fmt in self.FIELDS if key in record}
        if record.get("no_update_steps"):  # steps that learned nothing so far: shown once there are any
            out["no-update"] = str(record["no_update_steps"])
        return out

    def update(self, record: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(self.format(record), refresh=False)
            self.bar.update(1)
        elif self.enabled:
            parts = " ".join(f"{k}={v}" for k, v in self.format(record).items())
            print(f"step {record['step']}/{self.total} {parts} step_time={record['step_time_s']:.1f}s", flush=True)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False


PAIR_FIELDS = (("loss", "loss", "{:.4f}"), ("acc", "accuracy", "{:.2f}"), ("margin", "margins", "{:.3f}"),
               ("round", "round", "{}"), ("pairs/s", "pairs_per_s", "{:.1f}"))
"""Progress fields of the pairwise trainers (``postrl dpo``, ``postrl rm``)."""
