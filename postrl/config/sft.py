"""The section of ``postrl sft``: demonstrations and the supervised loop."""

from __future__ import annotations

from dataclasses import dataclass

from .checks import Problems, ConfigTree



@dataclass
class SFTConfig:
    """Supervised fine-tuning data and loop of ``postrl sft`` (see docs/sft-and-pipeline.md).

    ``batch_size`` counts training rows per optimizer update: examples, or packed rows of up to
    ``max_length`` tokens with ``packing``; ``micro_batch_size`` rows per forward/backward (must divide
    it). Optimizer settings (lr, schedule, betas, grad_clip, save_every, keep_checkpoints) come from ``train``.
    """

    path: str | None = None
    """Examples: .jsonl / .parquet file, a ``datasets`` directory (save_to_disk) or data file, or a hub dataset
    name (online only). Formats: prompt+completion, messages, text. None = demonstrations built from ``data``
    (prompt rendered as in ``postrl train``, completion = ``completion_template``)."""
    eval_path: str | None = None
    """Held-out examples (same formats); None = hold out ``eval_size`` examples of ``path``."""
    split: str = "train"
    """Split of a ``datasets`` dataset to train on."""
    eval_split: str | None = None
    """Split of a ``datasets`` dataset for held-out examples; None = hold out ``eval_size`` of ``split``."""
    train_size: int = 0
    """Training examples to use; 0 = all."""
    eval_size: int = 64
    """Held-out examples (when no eval_path / eval_split is given)."""
    completion_template: str = "{answer}"
    """With path None: the demonstration completion; ``{answer}`` is the example's reference answer."""
    max_length: int = 512
    """Maximum tokens per example; longer ones keep their first max_length tokens (the end of the completion
    is cut) and are counted; an example with no completion token left is dropped and counted."""
    packing: bool = False
    """Pack several examples into rows of up to max_length tokens (no attention across examples)."""
    batch_size: int = 8
    """Rows (examples, or packed rows) per optimizer update."""
    micro_batch_size: int = 0
    """Rows per forward/backward (gradients accumulate); must divide batch_size; 0 = batch_size."""
    epochs: int = 1
    """Passes over the training rows."""
    max_steps: int = 0
    """Stop after this many optimizer updates; 0 = epochs x ceil(rows / batch_size)."""

    def validate(self, p: Problems, cfg: ConfigTree) -> None:
        for key in ("train_size", "eval_size", "max_steps"):
            p.at_least(f"sft.{key}", getattr(self, key), 0)
        for key in ("max_length", "batch_size", "epochs"):
            p.at_least(f"sft.{key}", getattr(self, key), 1)
        p.check("{answer}" in self.completion_template, "sft.completion_template", self.completion_template,
                "must contain '{answer}' where the reference answer is inserted")
        p.micro_batch_divides("sft", self.batch_size, self.micro_batch_size, "rows")
