"""The Python API: the CLI's commands as functions, for scripts and notebooks (docs/python-api.md).

::

    import postrl

    def brevity(prompts, completions, **kwargs):          # a TRL-style reward function
        return [1.0 / (1 + len(c)) for c in completions]

    result = postrl.train("recipes/quickstart.yaml", "train.steps=5", rewards=[brevity])
    result.run_dir, result.results, result.final_model, result.metrics

Each command takes a config (a YAML path, a dict of sections, a :class:`postrl.config.Config`, or None for
the command's default recipe) and dotted override strings, exactly as ``postrl <command> CONFIG key=value``
does, and returns a :class:`RunResult`. ``rewards=`` (``train``, ``dpo``, ``pipeline``) takes Python
callables: they are registered in-process under generated names (``python:brevity``) for the duration of
the call and put into the config's ``rewards`` list (see :func:`postrl.rewards.python_rewards`).

Evaluation is :func:`evaluate`, not ``eval``: ``postrl.eval`` is the evaluation subpackage, and importing
it (``import postrl.eval.runner``) sets the attribute ``postrl.eval`` to that module, which would replace a
function of the same name.

Errors: a Python argument of the wrong type (a non-callable reward, a config that is not a path, dict or
Config) raises :class:`TypeError`; a bad config (unknown key, wrong value, unknown reward or command name)
raises :class:`postrl.config.ConfigError` (a ValueError), as the CLI's exit code 2 does. Importing this
module is cheap: torch and transformers are imported by the commands when they run.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    from postrl.config import Config

RECIPES = Path(__file__).resolve().parent / "recipes"
"""The recipes shipped inside the package (the same files as ``recipes/`` in a checkout)."""

ConfigSource = Union[str, "os.PathLike[str]", Mapping[str, Any], "Config", None]
"""What a command takes as its config: a YAML path, a dict of sections, a Config, or None (default recipe)."""

DEFAULT_RECIPES = {"train": "quickstart.yaml", "sft": "sft.yaml", "dpo": "dpo.yaml", "rm": "rm.yaml",
                   "pipeline": "pipeline_tiny.yaml"}
"""The recipe each command runs when no config is given (as the CLI does)."""


@dataclass
class RunResult:
    """What a training command returns.

    run_dir:  the run directory (``config.yaml``, ``metrics.jsonl``, ``results.json``, checkpoints, ...).
    results:  the trainer's results (the contents of ``results.json``: ``eval_before``, ``eval_after``, ...).
    config:   the resolved :class:`postrl.config.Config` the run used (with the generated reward names).
    """

    run_dir: Path
    results: dict[str, Any]
    config: Any = None

    @property
    def final_model(self) -> Optional[Path]:
        """``run_dir / "final"`` when it exists, else the ``final_model`` the results name (a pipeline's last
        stage), else None (e.g. an interrupted run)."""
        final = self.run_dir / "final"
        if final.is_dir():
            return final
        named = self.results.get("final_model") if isinstance(self.results, dict) else None
        return Path(named) if named and Path(named).exists() else None

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.jsonl`` (one per step; empty when the command writes none)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class EvalResult:
    """What :func:`evaluate` returns: the output directory and the contents of its ``eval.json``."""

    out_dir: Path
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def models(self) -> list[dict[str, Any]]:
        """One entry per model: ``name``, ``model``, ``pass_at_k``, ``maj_at_k`` and the other metrics, each
        with its confidence interval (see docs/evaluation.md)."""
        return list(self.results.get("models", []))


# ----- config ------------------------------------------------------------------------------------------
def _overrides(overrides: Sequence[Any]) -> list[str]:
    """Flatten ``"a=1", ["b=2", "c=3"]`` into strings; anything else is a TypeError."""
    out: list[str] = []
    for item in overrides:
        if isinstance(item, (list, tuple)):
            out.extend(_overrides(item))
        elif isinstance(item, str):
            out.append(item)
        else:
            raise TypeError(f"overrides must be strings like 'train.steps=5', got {type(item).__name__} {item!r}")
    return out


def load(command: str, config: ConfigSource = None, *overrides: Any, resume: Any = None) -> "Config":
    """The validated config a command would run with, resolved as the CLI resolves it.

    ``config`` None: with ``resume=RUN_DIR``, that run's ``config.yaml``; else the command's default recipe
    (:data:`DEFAULT_RECIPES`). A string that looks like ``key=value`` and is not a file is taken as the first
    override (``postrl.train("train.steps=5")``, like ``postrl train train.steps=5``).
    """
    from postrl.config import Config, load_config

    _check_command(command)
    extra = _overrides(overrides)
    if isinstance(config, str) and "=" in config and not Path(config).exists():
        extra.insert(0, config)
        config = None
    if config is None:
        saved = Path(resume) / "config.yaml" if isinstance(resume, (str, os.PathLike)) else None
        config = saved if saved is not None and saved.is_file() else RECIPES / DEFAULT_RECIPES[command]
    if not isinstance(config, (str, os.PathLike, Mapping, Config)):
        raise TypeError(f"config must be a YAML path, a dict of config sections or a postrl.config.Config, "
                        f"got {type(config).__name__}")
    saved_run_config = (resume is not None and isinstance(config, (str, os.PathLike))
                        and Path(config).resolve() == (Path(resume) / "config.yaml").resolve())
    return load_config(config, extra, migrate=saved_run_config)  # a run's own config may predate key moves


def _check_command(command: str) -> None:
    from postrl.config import ConfigError

    if command not in DEFAULT_RECIPES:
        close = difflib.get_close_matches(str(command), list(DEFAULT_RECIPES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown command {command!r}.{hint} Valid: {', '.join(DEFAULT_RECIPES)}")


# ----- commands ----------------------------------------------------------------------------------------
def _trainer(command: str) -> Callable[..., tuple[Path, dict[str, Any]]]:
    """The trainer entry point of a command (imported only now: it pulls in torch and transformers)."""
    if command == "train":
        from postrl.trainer.rl import train as fn
    elif command == "sft":
        from postrl.trainer.sft import train_sft as fn
    elif command == "dpo":
        from postrl.trainer.preference import train_dpo as fn
    elif command == "rm":
        from postrl.trainer.reward_model import train_rm as fn
    else:
        from postrl.trainer.pipeline import run_pipeline as fn
    return fn


def run_command(command: str, config: ConfigSource = None, *overrides: Any, rewards: Any = None,
                extend_rewards: bool = False, resume: Optional[Union[str, os.PathLike]] = None,
                run_dir: Optional[Union[str, os.PathLike]] = None) -> RunResult:
    """Run ``command`` (``train``, ``sft``, ``dpo``, ``rm`` or ``pipeline``) as ``postrl <command>`` would.

    rewards:        Python rewards (a list of callables, ``(callable, weight)`` tuples, registered names,
                    ``RewardSpec`` or ``{"fn": ..., "weight": ..., "name": ...}`` dicts; or ``{callable: weight}``;
                    see :func:`postrl.rewards.python_rewards`). They replace the config's ``rewards`` list,
                    or are appended to it with ``extend_rewards=True``.
    resume:         a run directory to continue from its latest checkpoint (``--resume``).
    run_dir:        start the new run in this (empty) directory instead of ``run.output_dir/run.name``
                    (not for ``pipeline``).
    """
    from postrl.rewards import python_rewards

    cfg = load(command, config, *overrides, resume=resume)
    kwargs: dict[str, Any] = {}
    if resume is not None:
        kwargs["resume"] = resume
    if run_dir is not None:
        if command == "pipeline":
            raise TypeError("pipeline() takes no run_dir: the pipeline's directory is run.output_dir/run.name")
        kwargs["run_dir"] = Path(run_dir)
    if rewards is None:
        if extend_rewards:
            raise TypeError("extend_rewards=True needs rewards=[...]")
        run_dir_out, results = _trainer(command)(cfg, **kwargs)
        return RunResult(Path(run_dir_out), results, cfg)
    with python_rewards(rewards) as specs:
        cfg.rewards = (list(cfg.rewards) + specs) if extend_rewards else specs
        run_dir_out, results = _trainer(command)(cfg, **kwargs)
    return RunResult(Path(run_dir_out), results, cfg)


def train(config: ConfigSource = None, *overrides: Any, rewards: Any = None, extend_rewards: bool = False,
          resume: Optional[Union[str, os.PathLike]] = None,
          run_dir: Optional[Union[str, os.PathLike]] = None) -> RunResult:
    """RL training, like ``postrl train CONFIG key=value ...``; no config = ``recipes/quickstart.yaml``.

    See :func:`run_command` for ``rewards``, ``extend_rewards``, ``resume`` and ``run_dir``.
    """
    return run_command("train", config, *overrides, rewards=rewards, extend_rewards=extend_rewards,
                       resume=resume, run_dir=run_dir)


def sft(config: ConfigSource = None, *overrides: Any, resume: Optional[Union[str, os.PathLike]] = None,
        run_dir: Optional[Union[str, os.PathLike]] = None) -> RunResult:
    """Supervised fine-tuning, like ``postrl sft``; no config = ``recipes/sft.yaml``."""
    return run_command("sft", config, *overrides, resume=resume, run_dir=run_dir)


def dpo(config: ConfigSource = None, *overrides: Any, rewards: Any = None, extend_rewards: bool = False,
        resume: Optional[Union[str, os.PathLike]] = None,
        run_dir: Optional[Union[str, os.PathLike]] = None) -> RunResult:
    """Preference optimization, like ``postrl dpo``; no config = ``recipes/dpo.yaml``. ``rewards`` rank the
    sampled completions of online DPO (``preference.online: true``)."""
    return run_command("dpo", config, *overrides, rewards=rewards, extend_rewards=extend_rewards,
                       resume=resume, run_dir=run_dir)


def rm(config: ConfigSource = None, *overrides: Any, resume: Optional[Union[str, os.PathLike]] = None,
       run_dir: Optional[Union[str, os.PathLike]] = None) -> RunResult:
    """A Bradley-Terry reward model, like ``postrl rm``; no config = ``recipes/rm.yaml``."""
    return run_command("rm", config, *overrides, resume=resume, run_dir=run_dir)


def pipeline(config: ConfigSource = None, *overrides: Any, rewards: Any = None, extend_rewards: bool = False,
             resume: Optional[Union[str, os.PathLike]] = None) -> RunResult:
    """Stages such as sft -> dpo -> grpo, like ``postrl pipeline``; no config = ``recipes/pipeline_tiny.yaml``.
    ``rewards`` are used by the stages that score completions (grpo, online dpo)."""
    return run_command("pipeline", config, *overrides, rewards=rewards, extend_rewards=extend_rewards,
                       resume=resume)


def evaluate(models: Sequence[Union[str, os.PathLike, RunResult]], task: Any = None, *, n: int = 64,
             k: Optional[Sequence[int]] = None, temperature: float = 1.0, top_p: float = 1.0,
             max_new_tokens: Optional[int] = None, batch_size: int = 256, seed: int = 0, bootstrap: int = 1000,
             maj_subsets: int = 32, greedy: bool = True, device: str = "auto", dtype: str = "auto",
             answer_extraction: Optional[str] = None, prompt_template: Optional[str] = None,
             system_prompt: Optional[str] = None, out: Optional[Union[str, os.PathLike]] = None,
             log: Callable[[str], None] = print) -> EvalResult:
    """pass@k, maj@k, greedy accuracy and more, like ``postrl eval`` (the same arguments; docs/evaluation.md).

    models: hub ids, model directories, run directories or :class:`RunResult` objects (their ``run_dir``).
    task:   a task spec (``"basic_arithmetic:size=100"``, ``"file.jsonl"``, ``"champ"``), an
            :class:`postrl.eval.tasks.EvalTask`, or None for the held-out set of the first model that is a
            training run directory.
    k:      the k values (default: powers of two up to ``n``).
    out:    the output directory (default as ``postrl eval --out``).
    """
    from postrl.eval.metrics import powers_of_two_up_to
    from postrl.eval.runner import EvalError, EvalSettings, resolve_model, run_eval
    from postrl.eval.tasks import EvalTask, build_task, task_from_run_config

    if isinstance(models, (str, os.PathLike, RunResult)):
        models = [models]
    specs = []
    for m in models:
        if isinstance(m, RunResult):
            specs.append(str(m.run_dir))
        elif isinstance(m, (str, os.PathLike)):
            specs.append(str(m))
        else:
            raise TypeError(f"models: give hub ids, paths or RunResult objects, got {type(m).__name__} {m!r}")
    settings = EvalSettings(n=n, ks=list(k) if k is not None else powers_of_two_up_to(max(1, n)),
                            temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, seed=seed, bootstrap=bootstrap, maj_subsets=maj_subsets,
                            greedy=greedy, device=device, dtype=dtype)
    settings.validate()
    if isinstance(task, str):
        task = build_task(task, answer_extraction, prompt_template, system_prompt)
    elif task is None:
        for spec in specs:
            run = resolve_model(spec)[1]
            if run is not None and (run / "config.yaml").is_file():
                cfg = load("train", run / "config.yaml")
                for attr, value in (("answer_extraction", answer_extraction), ("prompt_template", prompt_template),
                                    ("system_prompt", system_prompt)):
                    if value is not None:
                        setattr(cfg.data, attr, value)
                task = task_from_run_config(cfg, f"run:{run}")
                break
        else:
            raise EvalError("task is required unless a model is a training run directory (whose held-out set "
                            "is then used); e.g. task='basic_arithmetic:size=100' or task='champ'")
    elif not isinstance(task, EvalTask):
        raise TypeError(f"task must be a task spec string or an EvalTask, got {type(task).__name__}")
    out_dir, results = run_eval(specs, task, settings, out, log=log)
    return EvalResult(Path(out_dir), results)
