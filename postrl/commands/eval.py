"""``postrl eval --model M [--model M2 ...] --task SPEC --n 64 --k 1,2,4,...``: pass@k, maj@k and friends.

``postrl eval --model M --env NAME [--env-kwargs ...] [--tools ...] [--max-turns N]``: the same on multi-turn
episodes of an environment (success rate, return, turns, tool calls, pass@k over episodes).

See docs/evaluation.md for every metric's definition and the output files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "evaluate models on a task: pass@k, maj@k, greedy accuracy, reward, length, diversity, with bootstrap CIs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True, metavar="PATH_OR_ID",
                   help="hub id, model directory, or a `postrl train` run directory (its latest checkpoint); "
                        "repeat to compare models side by side")
    p.add_argument("--task", metavar="SPEC",
                   help="reasoning-gym 'NAME[:size=100,seed=0,KWARG=V]', a JSONL file 'file.jsonl[:size=N]', or "
                        "'champ[:size=N,category=C]'; default: the held-out set of the first --model that is a "
                        "run directory")
    p.add_argument("--n", type=int, default=64, help="samples per problem (default 64)")
    p.add_argument("--k", default=None, help="comma-separated k values (default: powers of two up to n)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0 = off)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation budget (default: 512 for champ, the run's eval budget for a run's held-out "
                        "set, else 64)")
    p.add_argument("--out", metavar="DIR",
                   help="output directory (default: a new RUN_DIR/eval[-N] when the first run-directory --model is "
                        "RUN_DIR, else a new runs/eval[-N]); a training run directory gets its eval/ subdirectory")
    p.add_argument("--batch-size", type=int, default=256, help="sequences decoded together (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling, maj@k subsets and the bootstrap")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs (default 1000)")
    p.add_argument("--maj-subsets", type=int, default=32, help="random k-subsets averaged for maj@k (default 32)")
    p.add_argument("--no-greedy", action="store_true", help="skip the greedy-decoding accuracy")
    p.add_argument("--answer-extraction", choices=("raw", "answer_tag", "boxed", "last_number"),
                   help="how answers are pulled from completions (default: the task's)")
    p.add_argument("--prompt-template", help="user message with a {question} placeholder (default: the task's)")
    p.add_argument("--system-prompt", help="system message (default: the task's, usually none)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    g = p.add_argument_group("environments (multi-turn episodes; docs/agents.md)")
    g.add_argument("--env", metavar="NAME",
                   help="evaluate on episodes of this environment (a registered name such as maze, wordle, "
                        "arithmetic, textarena, or module:Class) instead of single completions; default with a run "
                        "directory trained with env.name: that run's environment and held-out starts")
    g.add_argument("--env-kwargs", action="append", metavar="KWARGS",
                   help="environment arguments: key=value[,key=value] or a YAML mapping '{size: 3}' (repeatable)")
    g.add_argument("--tools", metavar="TOOLS",
                   help="tools the model may call: names 'calculator,python' or a YAML list "
                        "'[calculator, {name: search, corpus: docs.jsonl}]'")
    g.add_argument("--max-turns", type=int, default=None, help="model turns per episode (default 8)")
    g.add_argument("--max-episode-tokens", type=int, default=None,
                   help="token budget of an episode after its first observation (default 1024)")
    g.add_argument("--starts", type=int, default=None,
                   help="start states evaluated (environment seeds; with --task, its first samples); default 100, "
                        "or the run's data.eval_size; --n episodes are sampled from each (--max-new-tokens is the "
                        "per-turn budget, default 64)")
    # (every value is checked by EvalSettings.validate before a model or task loads)


ENV_ONLY = ("env_kwargs", "tools", "max_turns", "max_episode_tokens", "starts")


def _run_env_config(args):
    """The config of the first --model that is a training run directory with an environment, else None."""
    from postrl.config import load_config
    from postrl.eval.runner import resolve_model

    for spec in args.model:
        run_dir = resolve_model(spec)[1]
        if run_dir is not None and (run_dir / "config.yaml").is_file():
            cfg = load_config(run_dir / "config.yaml", [])
            return (cfg, run_dir) if cfg.env.name else None
    return None


def _env_task(args):
    """The environment task of the arguments, or None for single-turn evaluation."""
    from postrl.eval.env_eval import DEFAULT_STARTS, build_env_task, env_task_from_run_config, parse_env_kwargs, parse_tools
    from postrl.eval.runner import EvalError

    if args.env is None:
        given = [f"--{k.replace('_', '-')}" for k in ENV_ONLY if getattr(args, k) is not None]
        run = _run_env_config(args) if not args.task else None
        if run is None:
            if given:
                raise EvalError(f"{', '.join(given)}: only with --env (or a --model run directory trained with an "
                                "environment)")
            return None
        given = [g for g in given if g != "--starts"]  # fewer held-out starts is fine
        if given:
            raise EvalError(f"{', '.join(given)}: the run's environment is used as it was trained; give --env NAME "
                            "(with its settings) to evaluate on another one")
        if args.starts is not None and args.starts < 1:
            raise EvalError(f"--starts {args.starts}: must be >= 1")
        cfg, run_dir = run
        if args.system_prompt is not None:
            cfg.data.system_prompt = args.system_prompt
        return env_task_from_run_config(cfg, f"run:{run_dir}:env", starts=args.starts)
    unused = [flag for flag, v in (("--answer-extraction", args.answer_extraction),
                                   ("--prompt-template", args.prompt_template), ) if v is not None]
    if unused:
        raise EvalError(f"{', '.join(unused)}: not used with --env (the environment writes the observations and "
                        "judges the episodes)")
    for flag, v in (("--max-turns", args.max_turns), ("--max-episode-tokens", args.max_episode_tokens),
                    ("--starts", args.starts)):
        if v is not None and v < 1:
            raise EvalError(f"{flag} {v}: must be >= 1")
    samples = None
    if args.task:
        from postrl.eval.tasks import build_task

        samples = build_task(args.task, None, None, args.system_prompt).problems
    return build_env_task(
        args.env, parse_env_kwargs(args.env_kwargs), parse_tools(args.tools),
        max_turns=args.max_turns or 8, max_tokens_per_turn=args.max_new_tokens or 64,
        max_episode_tokens=args.max_episode_tokens or 1024,
        starts=args.starts or (len(samples) if samples is not None else DEFAULT_STARTS), seed=args.seed,
        samples=samples, system_prompt=args.system_prompt)


def _task(args):
    from postrl.config import load_config
    from postrl.eval.runner import EvalError, resolve_model
    from postrl.eval.tasks import build_task, task_from_run_config

    if args.task:
        return build_task(args.task, args.answer_extraction, args.prompt_template, args.system_prompt)
    for spec in args.model:
        run_dir = resolve_model(spec)[1]
        if run_dir is not None and (run_dir / "config.yaml").is_file():
            cfg = load_config(run_dir / "config.yaml", [])
            for attr, value in (("answer_extraction", args.answer_extraction),
                                ("prompt_template", args.prompt_template), ("system_prompt", args.system_prompt)):
                if value is not None:
                    setattr(cfg.data, attr, value)
            return task_from_run_config(cfg, f"run:{run_dir}")
    raise EvalError("--task is required unless a --model is a `postrl train` run directory (whose held-out set "
                    "is then used); e.g. --task basic_arithmetic:size=100 or --task champ")


def run(args: argparse.Namespace) -> int:
    import torch

    from postrl.commands._common import report_input_error
    from postrl.eval.metrics import parse_ks, powers_of_two_up_to
    from postrl.eval.runner import EvalError, EvalSettings, format_table, run_eval

    try:
        if args.threads < 0:
            raise EvalError(f"--threads {args.threads}: must be >= 0 (0 = leave as is)")
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        try:
            ks = parse_ks(args.k) if args.k else powers_of_two_up_to(max(1, args.n))
        except ValueError as exc:
            raise EvalError(f"--k {args.k}: {exc}") from None
        settings = EvalSettings(n=args.n, ks=ks, temperature=args.temperature, top_p=args.top_p,
                                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                                bootstrap=args.bootstrap, maj_subsets=args.maj_subsets, greedy=not args.no_greedy,
                                device=args.device, dtype=args.dtype)
        settings.validate()  # before the (possibly slow) task and models are built
        env_task = _env_task(args)
        if env_task is not None:
            from postrl.eval.env_eval import run_env_eval

            out_dir, result = run_env_eval(args.model, env_task, settings, args.out)
        else:
            task = _task(args)
            out_dir, result = run_eval(args.model, task, settings, args.out)
    except (ValueError, RuntimeError, OSError) as exc:
        from postrl.envs import EnvError

        if report_input_error(exc, (EvalError, EnvError)):
            return 2
        raise
    print()
    if env_task is not None:
        from postrl.eval.env_eval import format_env_table

        print(f"environment {result['task_name']}: {result['num_starts']} starts, greedy and n = {settings.n} "
              f"sampled episodes each, temperature {settings.temperature}; values with 95% bootstrap CIs over starts")
        print(format_env_table(result["models"]))
    else:
        print(f"task {result['task_name']}: {result['num_problems']} problems, n = {settings.n} samples each, "
              f"temperature {settings.temperature}; values with 95% bootstrap CIs over problems")
        print(format_table(result["models"]))
        for name in result["models"][0].get("tasks", {}):  # a mixture: the same table per task
            per_task = [{"name": m["name"], **m["tasks"][name]} for m in result["models"]]
            print(f"\ntask {name}: {per_task[0]['num_problems']} problems")
            print(format_table(per_task))
    for name in ("eval.json", "samples.jsonl", "pass_at_k.png"):
        print(f"{name}: {Path(out_dir) / name}")
    return 0
