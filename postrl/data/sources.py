"""Prompt sources: where training / held-out prompts and their scorers come from.

Two concrete sources:

- :class:`ReasoningGymSource` -- procedurally generated tasks from ``reasoning_gym``,
  scored by the task's own ``score_answer``.
- :class:`JsonlSource` -- a JSONL file of ``{"prompt": ..., "answer": ...}`` records,
  scored with ``math_verify``.

Both expose ``train``/``eval`` lists of :class:`Sample`, a ``name``, and
``score(completion, sample) -> float in [0, 1]`` / ``is_correct(completion, sample) -> bool``.
Scoring never raises: any failure inside the scorer yields 0.0.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import os
import random
import threading
from typing import Any, Optional

from .answers import hedge_reason
from .base import CORRECT_EPS, DataError, PromptSource, Sample  # noqa: F401  (CORRECT_EPS, Sample: re-exported)
from .toy import ToySource

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------
# reasoning-gym
# --------------------------------------------------------------------------------------

_RESERVED_RG_KWARGS = ("seed", "size")
# Max number of extra generation rounds used to top up the eval set after removing
# questions that also occur in train.
_EVAL_TOPUP_ROUNDS = 8


def _derive_seed(seed: int, stream: int) -> int:
    """Deterministic, well-separated seeds for independent streams (train=0, eval=1, 2, ...)."""
    return (int(seed) * 1_000_003 + stream * 7_919 + 12_345) % (2**31 - 1)


def _rg_registry() -> dict:
    import reasoning_gym  # noqa: F401  (registers all datasets)
    from reasoning_gym.factory import DATASETS

    return DATASETS


def _config_fields_text(config_cls) -> str:
    parts = []
    try:
        for f in dataclasses.fields(config_cls):
            if f.name in _RESERVED_RG_KWARGS:
                continue
            if f.default is not dataclasses.MISSING:
                parts.append(f"{f.name}={f.default!r}")
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                parts.append(f"{f.name}=<factory>")
            else:
                parts.append(f.name)
    except TypeError:
        return "(unknown)"
    return ", ".join(parts)


def _config_field_names(config_cls) -> Optional[list[str]]:
    try:
        return [f.name for f in dataclasses.fields(config_cls)]
    except TypeError:
        return None


class ReasoningGymSource(PromptSource):
    """Prompts from a reasoning-gym task.

    Train is ``create_dataset(task, size=train_size, seed=<derived from seed, stream 0>, **task_kwargs)``.
    Eval is generated from a different derived seed; any eval question that also appears in train
    (or earlier in eval) is dropped, and the eval set is topped up with further derived seeds
    (up to a few rounds). If the task's question space is too small to find ``eval_size`` unseen
    questions, the eval set is smaller than requested: a warning is logged and
    ``eval_shortfall`` records how many are missing.

    Scoring: extract the answer with ``answer_extraction`` and call the dataset's own
    ``score_answer(answer, entry)`` (reasoning-gym's default gives partial credit
    ``len(oracle)/len(answer)`` when the oracle is a substring of the answer).
    """

    def __init__(
        self,
        task: str,
        task_kwargs: Optional[dict] = None,
        train_size: int = 1000,
        eval_size: int = 100,
        seed: int = 0,
        answer_extraction: str = "answer_tag",
    ):
        super().__init__(answer_extraction)
        task_kwargs = dict(task_kwargs or {})
        if not isinstance(train_size, int) or train_size < 0:
            raise DataError(f"train_size must be a non-negative int, got {train_size!r}")
        if not isinstance(eval_size, int) or eval_size < 0:
            raise DataError(f"eval_size must be a non-negative int, got {eval_size!r}")

        registry = _rg_registry()
        if task not in registry:
            valid = sorted(registry)
            close = difflib.get_close_matches(str(task), valid, n=5, cutoff=0.6)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise DataError(
                f"unknown reasoning-gym task {task!r}.{hint} Valid tasks ({len(valid)}): {', '.join(valid)}"
            )
        self.task = task
        self.task_kwargs = task_kwargs
        self.seed = int(seed)
        self.name = task
        _, config_cls = registry[task]
        self._config_cls = config_cls

        for k in _RESERVED_RG_KWARGS:
            if k in task_kwargs:
                raise DataError(
                    f"reasoning-gym task {task!r}: do not pass {k!r} in task_kwargs "
                    f"(it is set from train_size/eval_size/seed)"
                )
        field_names = _config_field_names(config_cls)
        if field_names is not None:
            bad = [k for k in task_kwargs if k not in field_names]
            if bad:
                valid_kw = [n for n in field_names if n not in _RESERVED_RG_KWARGS]
                sugg = []
                for b in bad:
                    close = difflib.get_close_matches(b, valid_kw, n=3, cutoff=0.6)
                    if close:
                        sugg.append(f"{b!r} -> {', '.join(close)}")
                hint = f" (did you mean: {'; '.join(sugg)})" if sugg else ""
                raise DataError(
                    f"reasoning-gym task {task!r}: unknown task_kwargs {', '.join(map(repr, bad))}{hint}. "
                    f"Valid config fields: {_config_fields_text(config_cls)}"
                )

        train_seed = _derive_seed(self.seed, 0)
        self._dataset = self._make_dataset(max(train_size, 1), train_seed)
        train_entries = self._generate(self._dataset, train_size)
        self.train = [self._to_sample(e, "train", i, train_seed) for i, e in enumerate(train_entries)]

        seen = {s.question for s in self.train}
        eval_entries: list[tuple[dict, int]] = []
        stream = 1
        while len(eval_entries) < eval_size and stream <= 1 + _EVAL_TOPUP_ROUNDS:
            need = eval_size - len(eval_entries)
            # First round: exactly eval_size (so the common no-collision case is a plain dataset);
            # top-up rounds over-generate to compensate for collisions.
            n = need if stream == 1 else 2 * need + 16
            eval_seed = _derive_seed(self.seed, stream)
            ds = self._make_dataset(n, eval_seed)
            for e in self._generate(ds, n):
                q = e.get("question")
                if q in seen:
                    continue
                seen.add(q)
                eval_entries.append((e, eval_seed))
                if len(eval_entries) >= eval_size:
                    break
            stream += 1
        self.eval_shortfall = eval_size - len(eval_entries)
        if self.eval_shortfall > 0:
            logger.warning(
                "reasoning-gym task %r: only %d unseen eval questions found (requested %d); "
                "the task's question space is small relative to train_size",
                task,
                len(eval_entries),
                eval_size,
            )
        self.eval = [self._to_sample(e, "eval", i, sd) for i, (e, sd) in enumerate(eval_entries)]

    def _make_dataset(self, size: int, seed: int):
        import reasoning_gym

        try:
            return reasoning_gym.create_dataset(self.task, size=size, seed=seed, **self.task_kwargs)
        except (TypeError, ValueError, AssertionError, KeyError) as e:
            raise DataError(
                f"reasoning-gym task {self.task!r}: invalid task_kwargs {self.task_kwargs!r}: "
                f"{type(e).__name__}: {e}. Valid config fields: {_config_fields_text(self._config_cls)}"
            ) from e

    def _generate(self, dataset, n: int) -> list[dict]:
        out = []
        for i in range(n):
            try:
                out.append(dataset[i])
            except Exception as e:
                raise DataError(
                    f"reasoning-gym task {self.task!r} failed to generate item {i} with "
                    f"task_kwargs {self.task_kwargs!r}: {type(e).__name__}: {e}"
                ) from e
        return out

    def _to_sample(self, entry: dict, split: str, index: int, rg_seed: int) -> Sample:
        meta = dict(entry.get("metadata") or {})
        meta.setdefault("task", self.task)
        meta["split"] = split
        meta["index"] = index
        # (rg_seed, metadata["source_index"]) regenerates the entry with reasoning-gym.
        meta["rg_seed"] = rg_seed
        return Sample(
            question=str(entry["question"]),
            answer=str(entry["answer"]) if entry.get("answer") is not None else "",
            metadata=meta,
            entry=entry,
            uid=f"{self.task}/{split}/{index}",
        )

    def _score_extracted(self, extracted: str, sample: Sample) -> float:
        entry = sample.entry
        if entry is None:
            entry = {"question": sample.question, "answer": sample.answer, "metadata": sample.metadata}
        return self._dataset.score_answer(extracted, entry)


# --------------------------------------------------------------------------------------
# JSONL + math-verify
# --------------------------------------------------------------------------------------

_MV_TIMEOUT_S = 5


def _mv_timeout() -> Optional[int]:
    # math-verify's timeouts use signal.alarm, which only works in the main thread.
    return _MV_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _mv_parse(text: str, timeout: Optional[int]):
    from math_verify import parse

    parsed = parse(text, parsing_timeout=timeout)
    if not parsed and not text.strip().startswith("$"):
        parsed = parse(f"${text}$", parsing_timeout=timeout)
    return parsed


def _mv_constant(text: str) -> bool:
    """Whether math-verify reads ``text`` as a constant (a value without free symbols)."""
    try:
        parsed = _mv_parse(text, _mv_timeout())
    except Exception:  # noqa: BLE001 - unparseable: not a constant
        return False
    value = next((p for p in parsed if not isinstance(p, str)), None)
    return value is not None and not getattr(value, "free_symbols", {1})


@functools.lru_cache(maxsize=65536)
def _mv_parse_gold_cached(gold: str, timeout: Optional[int]):
    return _mv_parse(gold, timeout)


def math_verify_score(gold: str, predicted: str) -> float:
    """1.0 if ``predicted`` is mathematically equivalent to ``gold`` per math-verify, else 0.0.

    Plain numbers ("42", "0.5") and LaTeX ("\\frac{1}{2}", "$x^2$") both work. Never raises.
    Results are memoized per (gold, predicted): RL samples the same short answers over and over,
    and parsing dominates the cost of a step on small models.
    """
    gold, predicted = str(gold), str(predicted)
    if len(predicted) > 512:  # long texts: not memoized (bounded cache memory)
        return _math_verify_cached.__wrapped__(gold, predicted, _mv_timeout())
    return _math_verify_cached(gold, predicted, _mv_timeout())


@functools.lru_cache(maxsize=65536)
def _math_verify_cached(gold: str, predicted: str, timeout: Optional[int]) -> float:
    try:
        from math_verify import verify

        g = _mv_parse_gold_cached(gold, timeout)
        if not g:
            return 0.0
        p = _mv_parse(predicted, timeout)
        if not p:
            return 0.0
        return 1.0 if verify(g, p, timeout_seconds=timeout) else 0.0
    except BaseException as e:  # math-verify TimeoutException, sympy errors, ...
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        logger.debug("math-verify failed on gold=%r pred=%r: %r", gold, predicted, e)
        return 0.0


def read_json_lines(path: str | os.PathLike, what: str = "JSONL file") -> list[tuple[int, dict]]:
    """(1-based line number, record) of every non-blank line of a JSONL file; a missing or unreadable file, a
    malformed line or a line that is not a JSON object raises DataError naming the file and line."""
    path = str(path)
    if os.path.isdir(path):
        raise DataError(f"{what} {path} is a directory, not a JSONL file")
    if not os.path.isfile(path):
        raise DataError(f"{what} not found: {path}")
    try:
        with open(path, "r", encoding="utf-8-sig") as f:  # a UTF-8 byte-order mark (Windows editors) is fine
            lines = list(f)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {what} {path}: {e}") from e
    out: list[tuple[int, dict]] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from e
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        out.append((lineno, rec))
    return out


def _read_jsonl(path: str) -> list[tuple[int, dict]]:
    """Read and validate a prompt/answer JSONL file; returns (1-based line number, record) pairs."""
    records: list[tuple[int, dict]] = []
    for lineno, rec in read_json_lines(path):
        for key in ("prompt", "answer"):
            if key not in rec:
                raise DataError(f"{path}:{lineno}: missing required field {key!r} (fields present: {sorted(rec)})")
        if not isinstance(rec["prompt"], str):
            raise DataError(f"{path}:{lineno}: field 'prompt' must be a string, got {type(rec['prompt']).__name__}")
        if not rec["prompt"].strip():
            raise DataError(f"{path}:{lineno}: field 'prompt' is empty")
        ans = rec["answer"]
        if isinstance(ans, bool) or not isinstance(ans, (str, int, float)):
            raise DataError(
                f"{path}:{lineno}: field 'answer' must be a string or a number, got {type(ans).__name__}"
            )
        records.append((lineno, rec))
    if not records:
        raise DataError(f"JSONL file {path} contains no records")
    return records


class JsonlSource(PromptSource):
    """Prompts from a JSONL file with ``prompt`` (str) and ``answer`` (str or number) fields.

    Other fields are kept in ``Sample.metadata``. If ``eval_path`` is None, the records are
    shuffled with ``seed`` and the last ``min(eval_size, len // 2)`` are held out for eval;
    otherwise eval comes from ``eval_path`` (file order, first ``eval_size``; 0 = all) and
    train from ``path`` (shuffled with ``seed``). Train is capped at ``train_size`` (0 = all).
    Scoring uses math-verify (see :func:`math_verify_score`); a hedged answer (several candidates, such as
    ``3 or 5`` or two different ``\\boxed{}``; :func:`postrl.data.answers.hedge_reason`) scores 0.
    """

    def __init__(
        self,
        path: str,
        eval_path: Optional[str] = None,
        train_size: int = 0,
        eval_size: int = 100,
        seed: int = 0,
        answer_extraction: str = "answer_tag",
    ):
        super().__init__(answer_extraction)
        if not isinstance(train_size, int) or train_size < 0:
            raise DataError(f"train_size must be a non-negative int, got {train_size!r}")
        if not isinstance(eval_size, int) or eval_size < 0:
            raise DataError(f"eval_size must be a non-negative int, got {eval_size!r}")
        self.path = str(path)
        self.eval_path = str(eval_path) if eval_path is not None else None
        self.seed = int(seed)
        self.name = os.path.splitext(os.path.basename(self.path))[0]

        train_recs = [self._to_sample(self.path, ln, r, "train") for ln, r in _read_jsonl(self.path)]
        random.Random(self.seed).shuffle(train_recs)
        if self.eval_path is None:
            n_eval = min(eval_size, len(train_recs) // 2)
            eval_recs = train_recs[len(train_recs) - n_eval :] if n_eval > 0 else []
            train_recs = train_recs[: len(train_recs) - n_eval]
            for s in eval_recs:
                s.metadata["split"] = "eval"
        else:
            eval_recs = [self._to_sample(self.eval_path, ln, r, "eval") for ln, r in _read_jsonl(self.eval_path)]
            if eval_size > 0:
                eval_recs = eval_recs[:eval_size]
        if train_size > 0:
            train_recs = train_recs[:train_size]
        self.train = train_recs
        self.eval = eval_recs

    @staticmethod
    def _to_sample(path: str, lineno: int, rec: dict, split: str) -> Sample:
        base = os.path.basename(path)
        meta = {k: v for k, v in rec.items() if k not in ("prompt", "answer")}
        meta.update({"source_file": base, "line": lineno, "split": split})
        return Sample(
            question=rec["prompt"],
            answer=str(rec["answer"]),
            metadata=meta,
            entry=None,
            uid=f"{base}:{lineno}",
        )

    def score(self, completion: str, sample: Sample, strict: bool = False) -> float:
        extracted = self.extract(completion)
        if extracted and hedge_reason(extracted, str(sample.answer), completion, is_constant=_mv_constant,
                                      equal=lambda a, b: math_verify_score(a, b) >= 1.0):
            return 0.0  # whichever candidate is right must not pay
        return super().score(completion, sample, strict)

    def _score_extracted(self, extracted: str, sample: Sample) -> float:
        return math_verify_score(sample.answer, extracted)


# --------------------------------------------------------------------------------------
# factory
# --------------------------------------------------------------------------------------

SOURCES = {
    "reasoning_gym": ReasoningGymSource,
    "jsonl": JsonlSource,
    "toy": ToySource,
}


def build_source(source: str, **kwargs: Any) -> PromptSource:
    """Build a prompt source by name: ``"reasoning_gym"``, ``"jsonl"`` or ``"toy"``.

    kwargs are passed to the source's constructor (see :class:`ReasoningGymSource` and
    :class:`JsonlSource`); unknown kwargs raise DataError.
    """
    if source not in SOURCES:
        close = difflib.get_close_matches(str(source), list(SOURCES), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise DataError(f"unknown prompt source {source!r}.{hint} Valid sources: {', '.join(sorted(SOURCES))}")
    cls = SOURCES[source]
    import inspect

    params = inspect.signature(cls.__init__).parameters
    bad = [k for k in kwargs if k not in params or k == "self"]
    if bad:
        valid = [p for p in params if p != "self"]
        raise DataError(
            f"prompt source {source!r} got unexpected arguments {', '.join(map(repr, bad))}; "
            f"accepted: {', '.join(valid)}"
        )
    return cls(**kwargs)
