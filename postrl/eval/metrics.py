"""Evaluation metrics as pure functions: pass@k, maj@k, diversity, bootstrap confidence intervals.

Everything here works on plain Python / numpy values (no model, no I/O), so each estimator can be
checked against numbers worked out by hand (``tests/test_eval_metrics.py``).

Per-problem values are computed first (one number per problem and metric); a model's score is their
mean over problems, and its 95% confidence interval resamples *problems* (:func:`bootstrap_ci`), since
problems, not samples, are the independent units of an evaluation.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from fractions import Fraction
from typing import Callable, Hashable, Optional, Sequence

import numpy as np


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from ``n`` samples of which ``c`` are correct.

    Chen et al. 2021, "Evaluating Large Language Models Trained on Code" (arXiv:2107.03374), eq. 1:
    ``pass@k = 1 - C(n - c, k) / C(n, k)``, the probability that a random k-subset of the n samples
    (drawn without replacement) holds at least one correct sample. The binomial coefficients overflow
    floats for large n, so the ratio is computed as the product (their numerically stable form)

        C(n - c, k) / C(n, k) = prod_{i = n - c + 1}^{n} (1 - k / i)

    which is exact to floating-point rounding (a product of c factors in (0, 1]). When
    ``n - c < k`` every k-subset contains a correct sample and the result is exactly 1.

    Raises ValueError unless ``0 <= c <= n`` and ``1 <= k <= n`` (with ``k > n`` the estimator is
    undefined: sample at least k completions per problem).
    """
    n = _check_int("n (samples per problem)", n, 1)
    c = _check_int("c (correct samples)", c, 0)
    k = _check_int("k", k, 1)
    if c > n:
        raise ValueError(f"c (correct samples) = {c} cannot exceed n (samples per problem) = {n}")
    if k > n:
        raise ValueError(f"pass@k needs k <= n: k = {k} but only n = {n} samples per problem; "
                         f"sample n >= {k} completions or drop k = {k}")
    if n - c < k:
        return 1.0
    if c == 0:
        return 0.0
    i = np.arange(n - c + 1, n + 1, dtype=np.float64)
    return float(1.0 - np.prod(1.0 - k / i))


def pass_at_k_exact(n: int, c: int, k: int) -> Fraction:
    """The same estimator as :func:`pass_at_k` as an exact fraction ``1 - C(n-c, k) / C(n, k)``
    (Chen et al. 2021, eq. 1), for checking the float version; same validation."""
    pass_at_k(n, c, k)  # validates the arguments
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


# --------------------------------------------------------------------------------------------------
# answers: normalization and majority vote
# --------------------------------------------------------------------------------------------------

_LATEX_NOISE = re.compile(r"\\(?:left|right|displaystyle|!|,|;|:|quad|qquad)")
_TEXT_WRAP = re.compile(r"^\\(?:text|mathrm|textbf|mathbf)\{(.*)\}$", re.DOTALL)
_BOXED_WRAP = re.compile(r"^\\(?:boxed|fbox)\{(.*)\}$", re.DOTALL)
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_FRACTION = re.compile(r"([-+]?\d+)\s*/\s*(\d+)")
_LATEX_FRAC = re.compile(r"^(-?)\\[dt]?frac\{(-?\d+)\}\{(\d+)\}$")


def normalize_answer(answer: Optional[str]) -> Optional[str]:
    """Canonical string form of an extracted answer, so that equal answers vote together in maj@k.

    Rules, in order: ``None`` or blank -> ``None`` (an abstention); strip whitespace, surrounding ``$``,
    a ``\\boxed{..}`` / ``\\text{..}`` wrapper, ``\\left`` / ``\\right`` and LaTeX spacing commands; drop
    one trailing period; lower-case; collapse internal whitespace to one space (and drop spaces around
    ``= + - * / ^ , ( ) [ ] { }``). Then a number is written canonically as an exact rational: thousands
    separators removed (``1,234`` -> ``1234``), ``2.50`` -> ``5/2``, ``\\frac{6}{4}`` and ``6/4`` ->
    ``3/2``, ``-0`` -> ``0``, ``3.0`` -> ``3``. Anything else is kept as the cleaned string.
    """
    if answer is None:
        return None
    s = str(answer).strip()
    for _ in range(3):  # nested wrappers like $\boxed{\text{yes}}$.
        s = s.strip()
        s = s[:-1].rstrip() if s.endswith(".") else s
        s = s.strip("$").strip()
        m = _BOXED_WRAP.match(s) or _TEXT_WRAP.match(s)
        if m:
            s = m.group(1)
    s = _LATEX_NOISE.sub("", s).strip()
    if s.endswith("."):
        s = s[:-1]
    s = re.sub(r"\s+", " ", s.lower()).strip()
    s = re.sub(r"\s*([=+\-*/^,()\[\]{}])\s*", r"\1", s)
    if not s:
        return None
    number = _canonical_number(s)
    return number if number is not None else s


def _canonical_number(s: str) -> Optional[str]:
    t = s.replace("−", "-")
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", t):
        t = t.replace(",", "")
    value: Optional[Fraction] = None
    if _NUMBER.fullmatch(t):
        value = Fraction(t)
    elif _FRACTION.fullmatch(t):
        num, den = _FRACTION.fullmatch(t).groups()
        value = Fraction(int(num), int(den)) if int(den) != 0 else None
    elif _LATEX_FRAC.fullmatch(t):
        sign, num, den = _LATEX_FRAC.fullmatch(t).groups()
        value = (-1 if sign else 1) * Fraction(int(num), int(den)) if int(den) != 0 else None
    if value is None:
        return None
    return str(value)  # Fraction prints "3" or "3/2"


def majority_vote(answers: Sequence[Optional[Hashable]]) -> tuple[Optional[Hashable], Optional[int]]:
    """The most frequent answer among ``answers`` (``None`` entries are abstentions and never win).

    Self-consistency voting (Wang et al. 2022, "Self-Consistency Improves Chain of Thought Reasoning
    in Language Models", arXiv:2203.11171). Ties are broken by the earliest first occurrence in
    ``answers`` (so the vote is deterministic and does not favour any particular answer string).
    Returns ``(answer, index of its first occurrence)``, or ``(None, None)`` when every entry is None.
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None, None
    first: dict[Hashable, int] = {}
    for i, a in enumerate(answers):
        if a is not None and a not in first:
            first[a] = i
    best = max(counts, key=lambda a: (counts[a], -first[a]))
    return best, first[best]


def maj_at_k(answers: Sequence[Optional[Hashable]], correct: Sequence[bool], k: int,
             num_subsets: int = 32, seed: int = 0) -> float:
    """maj@k of one problem: the probability that a majority vote over k samples is correct.

    ``answers[i]`` is sample i's *normalized* extracted answer (None = no answer) and ``correct[i]``
    whether the verifier accepted sample i. A vote over a subset picks :func:`majority_vote` of the
    subset (in sample order, so ties go to the answer that appears first in the subset) and is correct
    when the sample that first gave the winning answer was correct; a subset with no answer at all is
    wrong.

    Estimate: with ``k == n`` the single full set (exact). With ``k < n`` the mean over
    ``num_subsets`` k-subsets drawn uniformly without replacement with a numpy generator seeded by
    ``seed`` (an unbiased Monte-Carlo estimate of the expectation over all C(n, k) subsets; when
    C(n, k) <= num_subsets every subset is enumerated instead, which is exact).
    """
    n = len(answers)
    if n != len(correct):
        raise ValueError(f"maj_at_k: {n} answers but {len(correct)} correctness flags")
    k = _check_int("k", k, 1)
    if n == 0:
        raise ValueError("maj_at_k: no samples")
    if k > n:
        raise ValueError(f"maj@k needs k <= n: k = {k} but only n = {n} samples per problem")
    _check_int("num_subsets", num_subsets, 1)

    def vote(idx: Sequence[int]) -> float:
        _, first = majority_vote([answers[i] for i in idx])
        return float(bool(correct[idx[first]])) if first is not None else 0.0

    if k == n:
        return vote(list(range(n)))
    if math.comb(n, k) <= num_subsets:
        import itertools

        subsets = list(itertools.combinations(range(n), k))
        return float(np.mean([vote(s) for s in subsets]))
    rng = np.random.default_rng(seed)
    return float(np.mean([vote(sorted(rng.choice(n, size=k, replace=False).tolist())) for _ in range(num_subsets)]))


# --------------------------------------------------------------------------------------------------
# diversity
# --------------------------------------------------------------------------------------------------

def distinct_n(sequences: Sequence[Sequence[Hashable]], n: int) -> float:
    """distinct-n of a set of completions: #distinct n-grams / #n-grams, pooled over all sequences.

    Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation Models"
    (arXiv:1510.03055), section 4.1. n-grams never cross sequence boundaries. Sequences are lists of
    tokens (token ids or strings). Returns NaN when no sequence is n tokens long (undefined).
    """
    n = _check_int("n (n-gram order)", n, 1)
    grams: list[tuple] = []
    for seq in sequences:
        seq = list(seq)
        grams.extend(tuple(seq[i:i + n]) for i in range(len(seq) - n + 1))
    if not grams:
        return float("nan")
    return len(set(grams)) / len(grams)


def distinct_correct_answers(answers: Sequence[Optional[Hashable]], correct: Sequence[bool]) -> int:
    """Number of distinct (normalized) answers among the samples the verifier accepted.

    Several distinct correct answers arise when the verifier accepts equivalent forms (``1/2`` and
    ``0.5`` normalize together, ``\\frac{1}{2}`` and ``0.5`` do not) or when a task has several
    valid answers (e.g. puzzles with more than one solution).
    """
    if len(answers) != len(correct):
        raise ValueError(f"distinct_correct_answers: {len(answers)} answers but {len(correct)} flags")
    return len({a for a, ok in zip(answers, correct) if ok and a is not None})


# --------------------------------------------------------------------------------------------------
# confidence intervals
# --------------------------------------------------------------------------------------------------

def bootstrap_ci(values: Sequence[float], num_resamples: int = 1000, seed: int = 0, level: float = 0.95,
                 statistic: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of per-problem ``values``.

    Efron & Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13 (percentile interval): draw
    ``num_resamples`` resamples of the problems with replacement (numpy generator seeded by ``seed``),
    compute the mean of each, and return the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles.
    NaN values (metric undefined for that problem) are dropped first. ``statistic``, if given, maps
    a ``[B, P]`` array of resampled values to ``[B]`` (default: the row mean).

    Returns ``(nan, nan)`` for no finite values; a single value gives a zero-width interval.
    """
    _check_int("num_resamples", num_resamples, 1)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(num_resamples, x.size))
    stats = (statistic or (lambda a: a.mean(axis=1)))(x[idx])
    lo, hi = np.quantile(stats, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def mean_with_ci(values: Sequence[float], num_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, float]:
    """``{"value": mean, "ci": [lo, hi], "n": number of finite values}`` of per-problem ``values``
    (NaNs dropped; CI from :func:`bootstrap_ci`)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    lo, hi = bootstrap_ci(x, num_resamples, seed, level)
    return {"value": float(x.mean()) if x.size else float("nan"), "ci": [lo, hi], "n": int(x.size)}


def parse_ks(text: str | Sequence[int]) -> list[int]:
    """``"1,2,4"`` (or a list) -> sorted distinct positive ints; a clear error for anything else."""
    items = text.split(",") if isinstance(text, str) else list(text)
    ks = []
    for item in items:
        try:
            k = int(str(item).strip())
        except ValueError:
            raise ValueError(f"k values must be positive integers separated by commas (e.g. 1,2,4,8), "
                             f"got {item!r} in {text!r}") from None
        if k < 1:
            raise ValueError(f"k values must be >= 1, got {k} in {text!r}")
        ks.append(k)
    if not ks:
        raise ValueError("no k values given (e.g. --k 1,2,4,8)")
    return sorted(set(ks))


def powers_of_two_up_to(n: int) -> list[int]:
    """``[1, 2, 4, ..., <= n]`` plus ``n`` itself: the default k grid for n samples."""
    n = _check_int("n", n, 1)
    ks = [2 ** i for i in range(int(math.log2(n)) + 1)]
    return sorted(set(ks + [n]))
