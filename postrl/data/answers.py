"""Answer extraction from model completions.

``extract_answer(text, mode)`` pulls the final answer string out of a completion:

- ``raw``: the whole completion, stripped of surrounding whitespace.
- ``answer_tag``: the content of the *last* ``<answer>...</answer>`` block (stripped), or None.
- ``boxed``: the content of the *last* ``\\boxed{...}`` (balanced braces, nesting allowed), or None.
- ``last_number``: the last integer / decimal / fraction-like number (``-3``, ``1,234.5``,
  ``3/4``, ``.5``, ``1e-3``), with thousands-separator commas removed, or None.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Optional

ANSWER_MODES = ("raw", "answer_tag", "boxed", "last_number")

_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
# Number: optional sign, either digits with comma-grouped thousands or plain digits, optional
# decimal part, or a bare ".5"; optional exponent; optional "/denominator" (fraction-like).
_NUMBER_RE = re.compile(
    r"(?<![\w.])"  # not glued to a preceding word char or dot
    r"[-+−]?"
    r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:[eE][-+]?\d+)?"
    r"(?:\s*/\s*\d+(?:\.\d+)?)?"
)


def _extract_answer_tag(text: str) -> Optional[str]:
    matches = _ANSWER_TAG_RE.findall(text)
    if not matches:
        return None
    return matches[-1].strip()


def _extract_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` with balanced braces (unclosed ones are ignored)."""
    result = None
    for m in _BOXED_RE.finditer(text):
        depth = 1
        i = m.end()
        start = i
        while i < len(text):
            c = text[i]
            if c == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
                i += 2  # escaped brace \{ or \} does not count
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    result = text[start:i].strip()
                    break
            i += 1
    return result


def _extract_last_number(text: str) -> Optional[str]:
    matches = _NUMBER_RE.findall(text)
    if not matches:
        return None
    num = matches[-1]
    num = num.replace("−", "-").replace(",", "")
    num = re.sub(r"\s+", "", num)
    if num.startswith("+"):
        num = num[1:]
    return num


def extract_answer(text: str, mode: str) -> Optional[str]:
    """Extract the answer from ``text`` according to ``mode`` (one of ``ANSWER_MODES``).

    Returns None when the expected structure is absent (never raises for bad text).
    Raises ValueError for an unknown mode.
    """
    if mode not in ANSWER_MODES:
        raise ValueError(f"unknown answer extraction mode {mode!r}; valid modes: {', '.join(ANSWER_MODES)}")
    if text is None:
        return None
    if not isinstance(text, str):
        text = str(text)
    if mode == "raw":
        return text.strip()
    if mode == "answer_tag":
        return _extract_answer_tag(text)
    if mode == "boxed":
        return _extract_boxed(text)
    return _extract_last_number(text)


def validate_answer_mode(mode: str) -> str:
    """Raise ValueError if ``mode`` is not a valid extraction mode; return it otherwise."""
    if mode not in ANSWER_MODES:
        raise ValueError(f"unknown answer extraction mode {mode!r}; valid modes: {', '.join(ANSWER_MODES)}")
    return mode


# Hedges: an answer that names several candidates, so that whichever is right pays. math-verify reads
# many of them leniently (``3 \\lor 5``, ``3 = 5``, ``3 \\approx 5``, ``3 \\\\ 5`` and cases are read
# as their last value), so they are refused before it sees them (status ``hedged``) unless the
# ground truth itself is written that way.
_HEDGE_TOKENS = (r"\\lor\b", r"\\vee\b", r"\\approx\b", r"\\sim\b", r"\\simeq\b", r"\\equiv\b",
                 r"\\to\b", r"\\rightarrow\b", r"\\Rightarrow\b", r"\\implies\b", r"\\mid\b",
                 r"\\colon\b", r"&", r"\\\\", r"\\begin\s*\{\s*(?:cases|array|aligned|gathered)",
                 r"\bor\b", r"\\pm\b", r"\\mp\b", r"\\neq\b", r"\\ne\b")
_HEDGE_RES = tuple(re.compile(t) for t in _HEDGE_TOKENS)
_MATH_SEGMENT = re.compile(r"(?<!\\)\$(.+?)(?<!\\)\$|\\\((.+?)\\\)", re.DOTALL)


def _all_boxed(text: str) -> list[str]:
    """The contents of every ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces), in order."""
    out, i = [], 0
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        if m.start() < i:
            continue
        depth, j = 1, m.end()
        while j < len(text) and depth:
            if text[j] == "\\" and j + 1 < len(text) and text[j + 1] in "{}":
                j += 2
                continue
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth == 0:
            out.append(text[m.end():j - 1].strip())
            i = j
    return out


def _split_top_level(text: str, sep: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += {"{": 1, "(": 1, "[": 1, "}": -1, ")": -1, "]": -1}.get(ch, 0)
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


_COLLECTION = re.compile(r"[\{\[\(][^{}\[\]()]*,[^{}\[\]()]*[\}\]\)]")  # {3, 5}, [0, 10], (3, 5)


def hedge_reason(pred: str, gold: str, scope: Optional[str] = None,
                 is_constant: Optional[Callable[[str], bool]] = None,
                 equal: Optional[Callable[[str, str], bool]] = None) -> Optional[str]:
    """Why an extracted answer ``pred`` is a hedge (several candidate answers, so that whichever is right
    pays), or None:

    * ``scope`` (the text the answer was taken from) holds ``\\boxed{}`` answers that differ;
    * the answer holds math segments (``$...$``) that differ;
    * it holds an alternative or a relation between candidates (``\\lor``, ``or``, ``\\approx``,
      ``\\to``, ``\\pm``, ``\\\\``, ``&``, cases, ...) that the ground truth does not;
    * with ``is_constant`` and ``equal`` (math-verify's, passed by the math reward and the JSONL source): it is
      a chain of equalities between constants that are not all equal (``3 = 5``), unless the ground truth is an
      equation.

    math-verify reads many such answers leniently (as their last value), so a verifier refuses them before
    comparing (the reward-hacking suite in tests/attacks/ shows each one).
    """
    squash = functools.partial(re.sub, r"\s+", "")
    listy = "," in gold or ";" in gold
    if scope is not None and not listy and len({squash(b) for b in _all_boxed(scope)}) > 1:
        return "several different \\boxed{} answers"
    segments = {squash(a or b) for a, b in _MATH_SEGMENT.findall(pred)}
    if not listy and len(segments) > 1:
        return "several different math segments"
    for rx, token in zip(_HEDGE_RES, _HEDGE_TOKENS):
        if rx.search(pred) and not rx.search(gold):
            return f"an alternative or relation between candidates ({token})"
    if not listy and _COLLECTION.search(pred.replace("\\{", "{").replace("\\}", "}")):
        return "a set, list or interval of several candidates"
    if is_constant is not None and equal is not None and "=" not in gold and pred.count("=") >= 1:
        constants = [part for part in _split_top_level(pred.replace("$", ""), "=") if part and is_constant(part)]
        if any(not equal(constants[0], c) for c in constants[1:]):
            return "an equation between different constants"
    return None
