"""Built-in verifier rewards: math answers, output format, length, and string matches.

==============  ===========================================================  ============================
reward name     what it checks                                               shape
==============  ===========================================================  ============================
``math``        the final answer is mathematically equal to the ground       per completion, process pool
                truth (math-verify: fractions, decimals, LaTeX, sets, ...)   (``parallel=True``)
``format``      the completion has the required structure                    per completion
                (``<think>...</think><answer>...</answer>`` or a regex),
                optional partial credit
``length``      DAPO's soft overlong punishment (eq. 13) or a target-length  batched (needs token ids)
                reward (linear, or L1's ``-alpha * |n - target|``)
``exact_match`` the extracted answer equals the ground truth (normalized)    per completion
``contains``    the ground truth occurs in the (extracted) completion        per completion
``regex``       a pattern (from kwargs or the sample's metadata) matches     per completion, process pool
==============  ===========================================================  ============================

Every reward returns :class:`postrl.rewards.Scored` with ``info["status"]`` so the training log
counts *why* completions scored what they did (``ok``, ``wrong_answer``, ``no_answer``, ...).
Invalid keyword arguments raise ``ValueError`` naming the argument and the valid values (the
pipeline counts that as a failure of the reward, logged once). docs/rewards-builtin.md has the
table of kwargs and statuses with YAML examples.
"""

from __future__ import annotations

import functools
import re
import threading
import unicodedata
from collections.abc import Sequence
from typing import Any, Optional

from postrl.data.answers import hedge_reason as data_hedge_reason
from postrl.data.answers import ANSWER_MODES, extract_answer
from postrl.rewards import register_reward
from postrl.rewards.base import RewardBatch, Scored

EXTRACT_MODES = ("auto",) + ANSWER_MODES
"""Answer extraction for the verifier rewards: ``auto`` plus the modes of :mod:`postrl.data.answers`."""

_INFO_CHARS = 200  # extracted answers are kept in ``info`` (sample logs) up to this many characters


# ---------------------------------------------------------------------------------------------
# extraction and normalization (pure helpers)
# ---------------------------------------------------------------------------------------------
def extract_final_answer(text: str, mode: str = "auto", fallback: str = "last_number") -> Optional[str]:
    """The final answer of a completion, or None when there is none.

    ``mode`` is one of :data:`EXTRACT_MODES`. ``raw``, ``answer_tag``, ``boxed`` and
    ``last_number`` are :func:`postrl.data.answers.extract_answer`. ``auto``:

    1. the content of the last ``<answer>...</answer>`` if there is one, else the whole text;
    2. inside it, the content of the last ``\\boxed{...}`` (nested braces handled) if any;
    3. else, if an ``<answer>`` tag was found, its whole content;
    4. else ``fallback`` applied to the whole text (``last_number`` for math, ``raw`` for strings).

    An empty result (``<answer></answer>``, an empty completion) is None.
    """
    if mode not in EXTRACT_MODES:
        raise ValueError(f"extract={mode!r} is not a valid extraction mode; valid: {', '.join(EXTRACT_MODES)}")
    if fallback not in ANSWER_MODES:
        raise ValueError(f"fallback={fallback!r} is not valid; valid: {', '.join(ANSWER_MODES)}")
    if text is None:
        return None
    if not isinstance(text, str):
        raise TypeError(f"completion must be a str, got {type(text).__name__}")
    if mode == "auto":
        tagged = extract_answer(text, "answer_tag")
        scope = tagged if tagged is not None else text
        out = extract_answer(scope, "boxed")
        if out is None:
            out = tagged if tagged is not None else extract_answer(text, fallback)
    else:
        out = extract_answer(text, mode)
    if out is None:
        return None
    out = out.strip()
    return out or None


def normalize_text(text: str, *, strip: bool = True, ignore_case: bool = False,
                   collapse_whitespace: bool = False, unicode_nfkc: bool = False) -> str:
    """Normalize a string before comparing it: optional NFKC folding (full-width digits, ligatures),
    whitespace runs collapsed to one space, case folded (``str.casefold``), ends stripped."""
    if unicode_nfkc:
        text = unicodedata.normalize("NFKC", text)
    if collapse_whitespace:
        text = re.sub(r"\s+", " ", text)
    if ignore_case:
        text = text.casefold()
    if strip:
        text = text.strip()
    return text


def _references(sample: Any, references_key: Optional[str], reward: str) -> list[str]:
    """The accepted ground-truth strings: ``sample.metadata[references_key]`` (a string or a list of
    strings) when ``references_key`` is set, else ``[sample.answer]``."""
    if references_key is not None:
        meta = getattr(sample, "metadata", None) or {}
        if references_key not in meta:
            raise ValueError(f"{reward}: references_key={references_key!r} but sample "
                             f"{getattr(sample, 'uid', '?')!r} has no such metadata key "
                             f"(keys: {sorted(meta)})")
        refs = meta[references_key]
        refs = [refs] if isinstance(refs, str) else list(refs)
    else:
        refs = [getattr(sample, "answer", None)]
    refs = [str(r) if isinstance(r, (int, float)) and not isinstance(r, bool) else r for r in refs]
    if not refs or any(not isinstance(r, str) for r in refs):
        raise ValueError(f"{reward}: the ground truth of sample {getattr(sample, 'uid', '?')!r} must be a "
                         f"string or a list of strings, got {refs!r}")
    return refs


def _clip(text: Optional[str]) -> Optional[str]:
    return None if text is None else text[:_INFO_CHARS]


# ---------------------------------------------------------------------------------------------
# math
# ---------------------------------------------------------------------------------------------
_MV_TIMEOUT_S = 5


def _mv_timeout() -> Optional[int]:
    # math-verify's own timeouts use signal.alarm, which works only in the main thread; elsewhere
    # the process pool's per-call timeout is the guard.
    return _MV_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


class _MathTimeout(Exception):
    pass


def _has_sympy(parsed: Sequence[Any]) -> bool:
    return any(not isinstance(p, str) for p in parsed)


_DELIMITED = re.compile(r"(?<!\\)\$|\\\(|\\\[")  # an unescaped $, or \( or \[


def _looks_like_prose(text: str) -> bool:
    """Two or more words of 3+ letters that are not LaTeX commands (``\\text{...}`` ignored):
    "The answer is 42" is prose, "x^2 + \\sin(x)" and "72 \\text{ dollars}" are not."""
    text = re.sub(r"\\(?:text|mbox|mathrm|textbf|textit)\s*\{[^{}]*\}", " ", text)
    return len(re.findall(r"(?<![\\A-Za-z])[A-Za-z]{3,}", text)) >= 2


def _parse_math(text: str, timeout: Optional[int]) -> list:
    """math-verify's parse of an *already extracted* answer.

    A bare answer is read as LaTeX first (wrapped in ``$...$``): math-verify's plain-text reader
    picks the last number of a string, so ``1+x^2`` would become ``2`` and ``(1, 2)`` would become
    ``2``. When the LaTeX reading yields no expression, the plain reading is used. Text that already
    has math delimiters (an unescaped ``$``, ``\\(``, ``\\[``) or reads as prose ("the answer is 42",
    e.g. the content of an ``<answer>`` tag) is parsed as it is: math-verify then finds the last
    expression in it.
    """
    from math_verify import parse
    from math_verify.errors import TimeoutException

    def run(s: str) -> list:
        try:
            return list(parse(s, parsing_timeout=timeout, raise_on_error=True))
        except TimeoutException as exc:
            raise _MathTimeout(str(exc)[:200]) from None
        except Exception:  # noqa: BLE001 - an unparsable string is just unparsable
            return []

    if _DELIMITED.search(text) or _looks_like_prose(text):
        return run(text)
    latex = run(f"${text}$")
    if _has_sympy(latex):
        return latex
    plain = run(text)
    if _has_sympy(plain):
        return plain
    return latex or plain


@functools.lru_cache(maxsize=16384)
def _parse_gold(gold: str, timeout: Optional[int]) -> tuple:
    return tuple(_parse_math(gold, timeout))


def math_equal(gold: str, predicted: str) -> bool:
    """True when ``predicted`` equals ``gold`` by math-verify (``\\frac{1}{2}`` = ``0.5`` = ``1/2`` =
    ``\\dfrac12``, ``\\{1,2\\}`` = ``\\{2,1\\}``, ``1,000`` = ``1000``, ``x^2+1`` = ``1+x^2``), with a
    string comparison (whitespace-insensitive) when either side does not parse.

    Raises :class:`TimeoutError` when math-verify times out (5 s per parse / comparison in the main
    thread).
    """
    from math_verify import verify
    from math_verify.errors import TimeoutException

    timeout = _mv_timeout()
    try:
        g = list(_parse_gold(gold, timeout))
        p = _parse_math(predicted, timeout)
    except _MathTimeout as exc:
        raise TimeoutError(f"math-verify timed out: {exc}") from None
    if _has_sympy(g) and _has_sympy(p):
        try:
            return bool(verify(g, p, timeout_seconds=timeout, raise_on_error=True))
        except TimeoutException:
            raise TimeoutError("math-verify timed out comparing the answers") from None
        except Exception:  # noqa: BLE001 - sympy could not compare them: fall back to strings
            pass
    squash = functools.partial(re.sub, r"\s+", "")
    return squash(gold) == squash(predicted)


def _is_constant(part: str) -> bool:
    parsed = _parse_math(part, _mv_timeout()) if part else []
    value = next((p for p in parsed if not isinstance(p, str)), None)
    return value is not None and not getattr(value, "free_symbols", {1})


def hedge_reason(pred: str, gold: str, scope: Optional[str] = None) -> Optional[str]:
    """Why an extracted answer is a hedge (several candidate answers), or None: :func:`postrl.data.answers.
    hedge_reason` (the one definition, also used by the default ``task`` reward of math data) with
    math-verify deciding which sides of an equation are constants and whether they are equal."""
    return data_hedge_reason(pred, gold, scope, is_constant=_is_constant, equal=math_equal)


@register_reward("math", parallel=True)
def math_reward(completion: str, sample: Any, *, extract: str = "auto", max_answer_chars: int = 1000) -> Scored:
    """1.0 when the completion's final answer equals ``sample.answer`` by math-verify, else 0.0.

    ``extract``: how the answer is found (:data:`EXTRACT_MODES`; ``auto`` = the ``<answer>`` tag,
    inside it the last ``\\boxed{}``, else the last number of the text; see
    :func:`extract_final_answer`). An extracted answer longer than ``max_answer_chars`` is not
    parsed (status ``too_long``): math-verify / sympy can take very long on adversarial input.

    A hedged answer (several candidates, :func:`hedge_reason`) scores 0 without being compared.

    Statuses: ``ok`` (correct), ``wrong_answer``, ``no_answer`` (nothing extracted), ``too_long``,
    ``hedged``, ``timeout`` (math-verify gave up; score 0). Runs in the reward process pool
    (``parallel=True``) so a hang is stopped by the pool's per-call timeout.
    """
    if max_answer_chars < 1:
        raise ValueError(f"math: max_answer_chars must be >= 1, got {max_answer_chars}")
    gold = _references(sample, None, "math")[0].strip()
    if not gold:
        raise ValueError(f"math: sample {getattr(sample, 'uid', '?')!r} has an empty ground-truth answer")
    pred = extract_final_answer(completion, extract, fallback="last_number")
    if pred is None:
        return Scored(0.0, {"status": "no_answer"})
    if len(pred) > max_answer_chars:
        return Scored(0.0, {"status": "too_long", "extracted": _clip(pred)})
    scope = None
    if extract in ("auto", "boxed"):
        tagged = extract_answer(completion, "answer_tag") if extract == "auto" else None
        scope = tagged if tagged is not None else completion
    try:
        reason = hedge_reason(pred, gold, scope)
        if reason is not None:
            return Scored(0.0, {"status": "hedged", "extracted": _clip(pred), "reason": reason})
        ok = math_equal(gold, pred)
    except TimeoutError:
        return Scored(0.0, {"status": "timeout", "extracted": _clip(pred)})
    return Scored(1.0 if ok else 0.0, {"status": "ok" if ok else "wrong_answer", "extracted": _clip(pred)})


# ---------------------------------------------------------------------------------------------
# format
# ---------------------------------------------------------------------------------------------
DEFAULT_FORMAT_TAGS = ("think", "answer")


def _tag_markers(tags: Sequence[str]) -> list[str]:
    if isinstance(tags, str) or not tags:
        raise ValueError(f"format: tags must be a non-empty list of tag names such as ['think', 'answer'], "
                         f"got {tags!r}")
    markers = []
    for t in tags:
        if not isinstance(t, str) or not re.fullmatch(r"[A-Za-z_][\w.-]*", t):
            raise ValueError(f"format: tag {t!r} is not a valid tag name (letters, digits, _ . -)")
        markers += [f"<{t}>", f"</{t}>"]
    return markers


_DEGENERATE = re.compile(r"[\W_]*", re.DOTALL)  # a block without one letter or digit


@functools.lru_cache(maxsize=256)
def structure_pattern(tags: tuple[str, ...] = DEFAULT_FORMAT_TAGS) -> re.Pattern:
    """The regex of the whole-completion structure ``<t1>...</t1><t2>...</t2>...``: optional
    whitespace around and between the blocks, and no block contains any of the tags (so a second
    ``<answer>`` or a stray ``</think>`` inside a block breaks the match)."""
    markers = _tag_markers(tags)
    any_marker = "|".join(re.escape(m) for m in markers)
    body = rf"((?:(?!{any_marker}).)*)"
    blocks = r"\s*".join(rf"{re.escape(f'<{t}>')}{body}{re.escape(f'</{t}>')}" for t in tags)
    return re.compile(rf"\s*{blocks}\s*", re.DOTALL)


def format_partial_credit(text: str, tags: Sequence[str] = DEFAULT_FORMAT_TAGS) -> float:
    """Fraction of the required markers found once each and in order, in [0, 1].

    The markers of ``tags = [think, answer]`` are ``<think>, </think>, <answer>, </answer>``
    (``2k`` markers for ``k`` tags). Scanning them in that order, a marker counts when it occurs
    exactly once in ``text`` and after the previous counted marker. The result is
    ``counted / 2k``: ``<think>a</think> answer: 5`` -> 2/4; all four markers in order but with
    text outside the blocks -> 4/4; ``<answer>5</answer><think>a</think>`` -> 2/4 (the answer
    markers come before the think markers); a marker repeated twice never counts.
    """
    markers = _tag_markers(tags)
    counted, last = 0, -1
    for m in markers:
        first = text.find(m)
        if first < 0 or text.find(m, first + 1) >= 0:
            continue
        if first > last:
            counted += 1
            last = first
    return counted / len(markers)


@register_reward("format")
def format_reward(completion: str, sample: Any, *, tags: Sequence[str] = DEFAULT_FORMAT_TAGS,
                  pattern: Optional[str] = None, match: str = "fullmatch", partial: bool = False,
                  partial_max: float = 0.5, prefix: str = "", require_content: bool = True) -> Scored:
    """1.0 when the completion has the required structure, else 0.0 (or partial credit).

    The structure is ``pattern`` (a regex, compiled with ``re.DOTALL``; ``match`` = ``fullmatch``
    (default: the whole completion) or ``search``) or, by default, the blocks of ``tags`` in order
    over the whole completion (:func:`structure_pattern`: ``<think>...</think><answer>...</answer>``
    with optional whitespace). ``prefix`` is prepended first (e.g. ``"<think>"`` when the chat
    template already opened the think block in the prompt).

    ``partial``: a completion that does not match gets
    ``partial_max * format_partial_credit(text, tags)`` (fraction of the tag markers present once
    each, in order), so never more than ``partial_max`` (< 1, the full match).

    ``require_content`` (default on, the tag structure only): every block must hold a letter or a
    digit; ``<think></think><answer> </answer>`` and blocks of punctuation are degenerate structures
    that satisfy the pattern without content and score 0 (status ``empty_block``, no partial credit).

    Statuses: ``ok`` (matches), ``partial`` (some markers, partial credit on), ``empty_block``,
    ``wrong_format``.
    """
    if match not in ("fullmatch", "search"):
        raise ValueError(f"format: match={match!r}; valid: 'fullmatch', 'search'")
    if not 0.0 <= float(partial_max) <= 1.0:
        raise ValueError(f"format: partial_max must be in [0, 1], got {partial_max}")
    tags = tuple(tags) if not isinstance(tags, str) else tags
    text = f"{prefix}{completion}"
    if pattern is not None:
        try:
            rx = _compile(pattern, 0)
        except re.error as exc:
            raise ValueError(f"format: pattern {pattern!r} is not a valid regex: {exc}") from None
    else:
        rx = structure_pattern(tags)
        match = "fullmatch"
    m = rx.fullmatch(text) if match == "fullmatch" else rx.search(text)
    if m is not None:
        if pattern is None and require_content and any(_DEGENERATE.fullmatch(b) for b in m.groups()):
            return Scored(0.0, {"status": "empty_block"})
        return Scored(1.0, {"status": "ok"})
    if partial:
        frac = format_partial_credit(text, tags)
        if frac > 0:
            return Scored(float(partial_max) * frac, {"status": "partial"})
    return Scored(0.0, {"status": "wrong_format"})


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str, flags: int) -> re.Pattern:
    return re.compile(pattern, flags | re.DOTALL)


# ---------------------------------------------------------------------------------------------
# length
# ---------------------------------------------------------------------------------------------
LENGTH_MODES = ("overlong", "target")
LENGTH_UNITS = ("tokens", "chars", "words")
TARGET_SHAPES = ("linear", "l1")


def target_length_reward(length: float, target: float, shape: str = "linear", alpha: float = 0.0003) -> float:
    """Reward for a completion of ``length`` units when ``target`` is asked for.

    ``linear``: ``max(0, 1 - |length - target| / target)`` -- 1 on target, 0 at 0 or 2x target.
    ``l1``: ``-alpha * |length - target|``, the length term of L1's LCPO-Exact reward
    (Aggarwal & Welleck 2025, "L1: Controlling How Long A Reasoning Model Thinks", arXiv:2503.04697,
    eq. 1: ``r = I(y = y_gold) - alpha * |n_gold - n_y|``, ``alpha = 0.0003``); the correctness
    term is a separate reward (``math``) in the same ``rewards:`` list.
    """
    if target <= 0:
        raise ValueError(f"length: target must be > 0, got {target}")
    if length < 0:
        raise ValueError(f"length: length must be >= 0, got {length}")
    if shape == "linear":
        return max(0.0, 1.0 - abs(length - target) / target)
    if shape == "l1":
        if alpha < 0:
            raise ValueError(f"length: alpha must be >= 0, got {alpha}")
        return -float(alpha) * abs(length - target)
    raise ValueError(f"length: shape={shape!r}; valid: {', '.join(TARGET_SHAPES)}")


def _lengths(batch: RewardBatch, unit: str) -> list[int]:
    if unit == "tokens":
        out = []
        for i, (ids, text) in enumerate(zip(batch.completion_ids, batch.completions)):
            if not ids and text:
                raise ValueError(f"length: unit='tokens' needs the completion token ids, but completion {i} "
                                 f"is non-empty text with no ids; pass completion_ids or use unit: chars / words")
            out.append(len(ids))
        return out
    if unit == "chars":
        return [len(t) for t in batch.completions]
    if unit == "words":
        return [len(t.split()) for t in batch.completions]
    raise ValueError(f"length: unit={unit!r}; valid: {', '.join(LENGTH_UNITS)}")


@register_reward("length", batched=True)
def length_reward(batch: RewardBatch, *, mode: str = "overlong", unit: str = "tokens",
                  max_len: Optional[int] = None, buffer: Optional[int] = None, penalty: float = 1.0,
                  target: Optional[float] = None, target_key: str = "target_length",
                  shape: str = "linear", alpha: float = 0.0003) -> list[Scored]:
    """Length shaping, counted in ``unit`` (``tokens`` = the sampled ids, ``chars``, ``words``).

    ``mode: overlong`` -- DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13;
    :func:`postrl.algorithms.shaping.overlong_penalty`): 0 up to ``max_len - buffer``, a linear ramp
    to ``-penalty`` at ``max_len``, ``-penalty`` beyond. ``max_len`` (= ``rollout.max_new_tokens``
    for tokens) and ``buffer`` are required. Statuses ``ok`` / ``in_buffer`` / ``overlong`` (longer
    than ``max_len``). Use this *or* ``algo.overlong_buffer``, not both (they would add up).

    ``mode: target`` -- :func:`target_length_reward` toward ``sample.metadata[target_key]`` when the
    sample has it (L1 puts the target in the prompt), else the ``target`` kwarg. Statuses
    ``under`` / ``exact`` / ``over``.
    """
    if mode not in LENGTH_MODES:
        raise ValueError(f"length: mode={mode!r}; valid: {', '.join(LENGTH_MODES)}")
    lengths = _lengths(batch, unit)
    if mode == "overlong":
        from postrl.algorithms.shaping import overlong_penalty

        if max_len is None or buffer is None:
            raise ValueError("length: mode 'overlong' needs max_len (e.g. rollout.max_new_tokens) and buffer "
                             f"(the ramp, tokens before max_len), got max_len={max_len}, buffer={buffer}")
        if int(max_len) < 1:
            raise ValueError(f"length: max_len must be >= 1, got {max_len}")
        values = overlong_penalty(lengths, int(max_len), int(buffer), float(penalty)).tolist() if lengths else []
        out = []
        for n, v in zip(lengths, values):
            status = "overlong" if n > max_len else ("in_buffer" if n > max_len - buffer else "ok")
            out.append(Scored(float(v), {"status": status, "length": n}))
        return out
    if shape not in TARGET_SHAPES:
        raise ValueError(f"length: shape={shape!r}; valid: {', '.join(TARGET_SHAPES)}")
    out = []
    for n, sample in zip(lengths, batch.samples):
        meta = getattr(sample, "metadata", None) or {}
        t = meta.get(target_key, target)
        if t is None:
            raise ValueError(f"length: mode 'target' needs a target: set kwarg target or sample "
                             f"metadata[{target_key!r}] (sample {getattr(sample, 'uid', '?')!r} has neither)")
        t = float(t)
        status = "exact" if n == t else ("under" if n < t else "over")
        out.append(Scored(target_length_reward(n, t, shape, alpha), {"status": status, "length": n}))
    return out


# ---------------------------------------------------------------------------------------------
# exact match / contains / regex
# ---------------------------------------------------------------------------------------------
def _norm_kwargs(strip: bool, ignore_case: bool, collapse_whitespace: bool, unicode_nfkc: bool) -> dict:
    return {"strip": bool(strip), "ignore_case": bool(ignore_case),
            "collapse_whitespace": bool(collapse_whitespace), "unicode_nfkc": bool(unicode_nfkc)}


@register_reward("exact_match")
def exact_match_reward(completion: str, sample: Any, *, extract: str = "auto", strip: bool = True,
                       ignore_case: bool = False, collapse_whitespace: bool = True, unicode_nfkc: bool = False,
                       references_key: Optional[str] = None) -> Scored:
    """1.0 when the extracted answer equals the ground truth after normalization, else 0.0.

    ``extract`` (:data:`EXTRACT_MODES`; ``auto`` = the ``<answer>`` tag / last ``\\boxed{}``, else the
    whole completion). Normalization (:func:`normalize_text`): ``strip``, ``collapse_whitespace``,
    ``ignore_case``, ``unicode_nfkc``. The ground truth is ``sample.answer``, or any of the strings in
    ``sample.metadata[references_key]``. Statuses: ``ok``, ``wrong_answer``, ``no_answer``.
    """
    norm = _norm_kwargs(strip, ignore_case, collapse_whitespace, unicode_nfkc)
    refs = _references(sample, references_key, "exact_match")
    pred = extract_final_answer(completion, extract, fallback="raw")
    if pred is None:
        return Scored(0.0, {"status": "no_answer"})
    p = normalize_text(pred, **norm)
    ok = any(normalize_text(r, **norm) == p for r in refs)
    return Scored(1.0 if ok else 0.0, {"status": "ok" if ok else "wrong_answer", "extracted": _clip(pred)})


@register_reward("contains")
def contains_reward(completion: str, sample: Any, *, extract: str = "raw", strip: bool = True,
                    ignore_case: bool = False, collapse_whitespace: bool = True, unicode_nfkc: bool = False,
                    whole_word: bool = False, references_key: Optional[str] = None) -> Scored:
    """1.0 when the ground truth occurs in the (extracted) completion, else 0.0.

    Both sides are normalized alike (:func:`normalize_text`). ``whole_word``: the occurrence must
    not be glued to a letter, digit or ``_`` on either side (so ``12`` is not found in ``123``).
    An empty ground truth is an error (it would be found everywhere). Statuses: ``ok``,
    ``not_found``, ``no_answer``.
    """
    norm = _norm_kwargs(strip, ignore_case, collapse_whitespace, unicode_nfkc)
    refs = [normalize_text(r, **norm) for r in _references(sample, references_key, "contains")]
    if any(not r for r in refs):
        raise ValueError(f"contains: sample {getattr(sample, 'uid', '?')!r} has an empty ground truth "
                         "(it would be contained in every completion)")
    pred = extract_final_answer(completion, extract, fallback="raw")
    if pred is None:
        return Scored(0.0, {"status": "no_answer"})
    p = normalize_text(pred, **norm)
    if whole_word:
        ok = any(re.search(rf"(?<!\w){re.escape(r)}(?!\w)", p) for r in refs)
    else:
        ok = any(r in p for r in refs)
    return Scored(1.0 if ok else 0.0, {"status": "ok" if ok else "not_found"})


@register_reward("regex", parallel=True)
def regex_reward(completion: str, sample: Any, *, pattern: Optional[str] = None, pattern_key: str = "regex",
                 match: str = "search", ignore_case: bool = False, extract: str = "raw") -> Scored:
    """1.0 when a regex matches the (extracted) completion, else 0.0.

    The pattern is the ``pattern`` kwarg, in which the literal ``{answer}`` is replaced by the
    escaped ground truth (``"The answer is {answer}\\\\b"``), or else ``sample.metadata[pattern_key]``.
    ``match``: ``search`` (anywhere, default) or ``fullmatch``; compiled with ``re.DOTALL``.
    Runs in the process pool (``parallel=True``): a pathological pattern on a long completion is
    stopped by the per-call timeout. Statuses: ``ok``, ``no_match``, ``no_answer``.
    """
    if match not in ("search", "fullmatch"):
        raise ValueError(f"regex: match={match!r}; valid: 'search', 'fullmatch'")
    if pattern is None:
        meta = getattr(sample, "metadata", None) or {}
        pattern = meta.get(pattern_key)
        if not isinstance(pattern, str):
            raise ValueError(f"regex: no pattern: give the kwarg pattern or put a string under sample "
                             f"metadata[{pattern_key!r}] (sample {getattr(sample, 'uid', '?')!r})")
    elif "{answer}" in pattern:
        pattern = pattern.replace("{answer}", re.escape(str(getattr(sample, "answer", ""))))
    try:
        rx = _compile(pattern, re.IGNORECASE if ignore_case else 0)
    except re.error as exc:
        raise ValueError(f"regex: pattern {pattern!r} is not a valid regex: {exc}") from None
    text = extract_final_answer(completion, extract, fallback="raw")
    if text is None:
        return Scored(0.0, {"status": "no_answer"})
    ok = (rx.search(text) if match == "search" else rx.fullmatch(text)) is not None
    return Scored(1.0 if ok else 0.0, {"status": "ok" if ok else "no_match"})
