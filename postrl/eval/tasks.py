"""Evaluation task specs: which problems ``postrl eval`` asks, how prompts look, and how answers are scored.

A task spec is one string, ``NAME[:key=value,key=value,...]``:

- ``basic_arithmetic:size=100,seed=7,min_terms=2`` -- a reasoning-gym task. ``size`` (default 100) held-out
  problems generated exactly like ``postrl train``'s held-out set for the same data settings
  (``seed`` = ``data.seed``, default 0; ``train_size`` = ``data.train_size``, default 1000, since held-out
  questions that also occur in the training set are skipped); every other key is a task keyword argument
  (``data.task_kwargs``); lists are written in brackets, ``operators=[+,-]``. Scored by the task's own
  ``score_answer``.
- ``path/to/file.jsonl[:size=50]`` -- every record (or the first ``size``) of a JSONL file with ``prompt``
  and ``answer`` fields, in file order, scored with math-verify.
- ``champ[:size=50,category=Combinatorics,seed=1]`` -- the 270 competition problems of CHAMP (Mao et al.
  2024, "CHAMP: A Competition-level Dataset for Fine-Grained Analyses of LLMs' Mathematical Reasoning
  Capabilities", arXiv:2401.06961) shipped in the PyPI package ``champ-dataset``; the prompt asks for a
  ``\\boxed{}`` answer, which is compared with the reference answer by math-verify (see :func:`champ_score`).
  ``size`` keeps the first problems in the package's order (after a shuffle with ``seed`` when given).

Every spec also takes ``answer_extraction=raw|answer_tag|boxed|last_number`` (how the answer is pulled from
a completion; default ``raw``, ``boxed`` for CHAMP).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from postrl.data.sources import DataError, JsonlSource, PromptSource, Sample, build_source, math_verify_score
from postrl.eval.metrics import normalize_answer

DEFAULT_RG_EVAL_SIZE = 100
DEFAULT_RG_TRAIN_SIZE = 1000  # = DataConfig.train_size, so the held-out set matches a default training run
CHAMP_PACKAGE = "champ_dataset"  # module of the PyPI package ``champ-dataset``
CHAMP_FILE = "dataset_files/v0.json"
CHAMP_PROMPT_TEMPLATE = (
    "Solve the following problem. Make sure to show your work before giving the final answer, "
    "and put the final answer in \\boxed{{}}.\n\n{question}"
)
CHAMP_CATEGORIES = ("Combinatorics", "Inequality", "Number-Theory", "Polynomial", "Sequence")


class TaskSpecError(DataError):
    """A task spec that cannot be understood; the message shows the valid forms."""


SPEC_HELP = ("valid task specs: a reasoning-gym task 'NAME[:size=100,seed=0,KWARG=VALUE,...]' "
             "(e.g. basic_arithmetic:size=100,seed=7), a JSONL file 'path/file.jsonl[:size=N]', "
             "or 'champ[:size=N,category=C,seed=S]'")


@dataclass
class EvalTask:
    """Problems of one evaluation, their scorer and prompt format.

    ``source`` scores completions (``score`` / ``extract``); ``problems`` are the samples asked.
    """

    spec: str
    name: str
    source: PromptSource
    problems: list[Sample]
    prompt_template: str = "{question}"
    system_prompt: Optional[str] = None
    default_max_new_tokens: int = 64
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# spec parsing
# --------------------------------------------------------------------------------------------------

def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets/braces/parentheses."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p for p in (s.strip() for s in parts) if p]


def _value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_task_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:k=v,k2=[a,b]"`` -> ``("name", {"k": v, "k2": ["a", "b"]})`` (values read as YAML scalars).

    The part after the *last* ``:`` is taken as options only when it looks like ``key=value`` pairs,
    so paths with colons still work.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise TaskSpecError(f"empty task spec; {SPEC_HELP}")
    spec = spec.strip()
    name, opts = spec, {}
    if ":" in spec:
        head, tail = spec.rsplit(":", 1)
        pairs = _split_top_level(tail)
        if pairs and all(re.match(r"^[A-Za-z_][\w.]*\s*=", p) for p in pairs):
            name = head
            for p in pairs:
                key, val = p.split("=", 1)
                key = key.strip()
                if key in opts:
                    raise TaskSpecError(f"task spec {spec!r}: option {key!r} given twice")
                opts[key] = _value(val.strip())
        elif tail.strip() == "":
            name = head
        elif (pairs and not os.path.exists(spec) and not re.search(r"[\\/]", head)
              and all(re.match(r"^[A-Za-z_][\w.]*\s*(=.*)?$", p) and "." not in p.split("=")[0] for p in pairs)):
            # `basic_arithmetic:size` (an option without a value), not a file name with a colon
            bad = [p for p in pairs if not re.match(r"^[A-Za-z_][\w.]*\s*=", p)]
            raise TaskSpecError(f"task spec {spec!r}: options after ':' must be key=value, got "
                                f"{', '.join(repr(b) for b in bad)}; {SPEC_HELP}")
    if not name:
        raise TaskSpecError(f"task spec {spec!r} has no task name; {SPEC_HELP}")
    return name, opts


def _pop_int(opts: dict, key: str, default: Optional[int], spec: str, minimum: int = 0) -> Optional[int]:
    v = opts.pop(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise TaskSpecError(f"task spec {spec!r}: {key} must be an integer >= {minimum}, got {v!r}")
    return v


def _no_more(opts: dict, spec: str, valid: str) -> None:
    if opts:
        raise TaskSpecError(f"task spec {spec!r}: unknown option(s) {', '.join(map(repr, opts))}; valid: {valid}")


def build_task(spec: str, answer_extraction: Optional[str] = None, prompt_template: Optional[str] = None,
               system_prompt: Optional[str] = None) -> EvalTask:
    """Build the :class:`EvalTask` for ``spec`` (see the module docstring for the forms).

    ``answer_extraction`` / ``prompt_template`` / ``system_prompt`` override the task's defaults (the
    spec's own ``answer_extraction=`` option wins over the argument).
    """
    name, opts = parse_task_spec(spec)
    extraction = opts.pop("answer_extraction", None) or answer_extraction
    if name.lower() == "champ":
        size = _pop_int(opts, "size", 0, spec)
        seed = _pop_int(opts, "seed", None, spec)
        category = opts.pop("category", None)
        _no_more(opts, spec, "size, seed, category, answer_extraction")
        source = ChampSource(size=size, seed=seed, category=category, answer_extraction=extraction or "boxed")
        return EvalTask(spec, "champ" + (f"-{category}" if category else ""), source, source.eval,
                        prompt_template or CHAMP_PROMPT_TEMPLATE, system_prompt, default_max_new_tokens=512,
                        info={"size": len(source.eval), "category": category, "seed": seed})
    if name.endswith(".jsonl") or os.path.sep in name or os.path.isfile(name):
        size = _pop_int(opts, "size", 0, spec)
        _no_more(opts, spec, "size, answer_extraction")
        if not os.path.isfile(name):
            raise TaskSpecError(f"task spec {spec!r}: JSONL file {name!r} not found; {SPEC_HELP}")
        source = JsonlSource(name, eval_path=name, train_size=0, eval_size=size,
                             answer_extraction=extraction or "raw")
        source.train = []  # every record is an evaluation problem
        return EvalTask(spec, source.name, source, source.eval, prompt_template or "{question}", system_prompt,
                        info={"path": str(Path(name).resolve()), "size": len(source.eval)})
    size = _pop_int(opts, "size", DEFAULT_RG_EVAL_SIZE, spec, minimum=1)
    seed = _pop_int(opts, "seed", 0, spec)
    train_size = _pop_int(opts, "train_size", DEFAULT_RG_TRAIN_SIZE, spec)
    try:
        source = build_source("reasoning_gym", task=name, task_kwargs=opts, train_size=train_size, eval_size=size,
                              seed=seed, answer_extraction=extraction or "raw")
    except DataError as exc:
        if "unknown reasoning-gym task" in str(exc):
            raise TaskSpecError(f"task spec {spec!r}: {exc}. Or: {SPEC_HELP}") from None
        raise
    source.train = []  # not needed for evaluation (it only kept the held-out set disjoint from it)
    return EvalTask(spec, name, source, source.eval, prompt_template or "{question}", system_prompt,
                    info={"size": len(source.eval), "seed": seed, "train_size": train_size, "task_kwargs": opts})


def task_from_run_config(cfg, spec: str) -> EvalTask:
    """The held-out set of a training run (its ``data`` section), with its prompt format."""
    from postrl.data import build_data_source

    source = build_data_source(cfg)
    source.train = []
    d = cfg.data
    return EvalTask(spec, f"{source.name} (held-out set of the run)", source, source.eval, d.prompt_template,
                    d.system_prompt, default_max_new_tokens=cfg.resolved_eval_max_new_tokens,
                    info={"source": d.source, "task": d.task, "path": d.path, "size": len(source.eval)})


# --------------------------------------------------------------------------------------------------
# CHAMP
# --------------------------------------------------------------------------------------------------

def champ_file() -> Path:
    """Path of CHAMP's problem file inside the installed ``champ-dataset`` package (not imported)."""
    spec = importlib.util.find_spec(CHAMP_PACKAGE)
    if spec is not None:
        for loc in spec.submodule_search_locations or []:
            p = Path(loc) / CHAMP_FILE
            if p.is_file():
                return p
    raise TaskSpecError("task 'champ' needs the PyPI package champ-dataset (pip install champ-dataset); "
                        "it is not installed in this environment")


@functools.lru_cache(maxsize=2)
def _champ_problems(path: str) -> tuple[tuple[str, str, str, str], ...]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    out = []
    for pid, p in data["problems"].items():
        out.append((pid, p["_raw_text"].replace("@@", ""), p["_raw_answer"], p.get("category", "")))
    return tuple(out)


def champ_gold_candidates(raw_answer: str) -> list[str]:
    """Reference answers for math-verify from a CHAMP ``_raw_answer`` (math is marked with ``@@..@@``).

    - no marked math (``"239"``, ``"98 values"``, ``"No"``): the text itself (math-verify finds the number);
    - marked alternatives joined by "equivalently" (``"@@C(10, 5)@@, or equivalently @@252@@"``): each
      marked expression as ``$...$``, any of them counts;
    - otherwise the text with each marked part as ``$...$`` (``"@@n@@ times"`` -> ``"$n$ times"``), so that
      math-verify parses the whole answer, e.g. ``"@@x=±1, ±2, ±1/2@@"`` as a set.
    """
    segments = re.findall(r"@@(.*?)@@", raw_answer, flags=re.DOTALL)
    if not segments:
        return [raw_answer.strip()]
    outside = re.sub(r"@@.*?@@", " ", raw_answer, flags=re.DOTALL)
    if len(segments) > 1 and "equivalent" in outside.lower():
        return [f"${s.strip()}$" for s in segments]
    return [re.sub(r"@@(.*?)@@", lambda m: f"${m.group(1).strip()}$", raw_answer, flags=re.DOTALL).strip()]


def champ_score(raw_answer: str, predicted: str) -> float:
    """1.0 when ``predicted`` (an extracted answer, e.g. the content of ``\\boxed{}``) matches the CHAMP
    reference: math-verify equivalence with any of :func:`champ_gold_candidates` (the prediction is read
    as LaTeX math, ``$predicted$``), or -- for free-text answers such as "No" -- equal text after
    :func:`normalize_answer`. Free-text answers with more words ("No positive integer solutions") are
    only matched verbatim, so CHAMP scores are a lower bound for models that paraphrase them."""
    pred = predicted.strip()
    if not pred:
        return 0.0
    as_math = pred if "$" in pred else f"${pred}$"
    for gold in champ_gold_candidates(raw_answer):
        if math_verify_score(gold, as_math) >= 1.0:
            return 1.0
    gold_text = normalize_answer(raw_answer.replace("@@", ""))
    return 1.0 if gold_text is not None and normalize_answer(pred) == gold_text else 0.0


class ChampSource(PromptSource):
    """The CHAMP problems as an evaluation-only prompt source (``train`` is empty, ``eval`` holds them).

    ``Sample.answer`` is the reference answer without its ``@@`` math markers; ``metadata`` keeps the raw
    answer, the category and CHAMP's problem id; ``uid`` is ``champ/<problem id>``.
    """

    def __init__(self, size: int = 0, seed: Optional[int] = None, category: Optional[str] = None,
                 answer_extraction: str = "boxed"):
        super().__init__(answer_extraction)
        self.name = "champ"
        problems = list(_champ_problems(str(champ_file())))
        if category is not None:
            valid = sorted({p[3] for p in problems})
            if category not in valid:
                raise TaskSpecError(f"champ: unknown category {category!r}; valid: {', '.join(valid)}")
            problems = [p for p in problems if p[3] == category]
        if seed is not None:
            random.Random(seed).shuffle(problems)
        if size:
            problems = problems[:size]
        self.eval = [Sample(question=text, answer=raw.replace("@@", "").strip(),
                            metadata={"raw_answer": raw, "category": cat, "id": pid, "split": "eval"},
                            uid=f"champ/{pid}") for pid, text, raw, cat in problems]

    def _score_extracted(self, extracted: str, sample: Sample) -> float:
        return champ_score(sample.metadata.get("raw_answer", sample.answer), extracted)
