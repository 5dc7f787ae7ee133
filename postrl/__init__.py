"""postrl: reinforcement-learning post-training of language models.

The Python API mirrors the CLI (docs/python-api.md)::

    import postrl

    result = postrl.train("recipes/quickstart.yaml", "train.steps=5", rewards=[my_reward])
    result.run_dir, result.results, result.final_model

``train``, ``sft``, ``dpo``, ``rm``, ``pipeline`` and ``evaluate`` (named so because ``postrl.eval`` is the
evaluation subpackage) live in :mod:`postrl.api`. Importing postrl is cheap: torch and transformers load
when a command runs.
"""

from __future__ import annotations

from postrl.api import EvalResult, RunResult, dpo, evaluate, pipeline, rm, sft, train


def __getattr__(name: str) -> str:
    """``postrl.__version__``, read from the installed package metadata on first use (it costs ~40 ms)."""
    if name == "__version__":
        from importlib import metadata

        try:
            return metadata.version("postrl")
        except metadata.PackageNotFoundError:  # a source tree that is not installed
            return "0+unknown"
    raise AttributeError(f"module 'postrl' has no attribute {name!r}")

__all__ = ["EvalResult", "RunResult", "__version__", "dpo", "evaluate", "pipeline", "rm", "sft", "train"]
