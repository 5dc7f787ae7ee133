"""Answer extraction from model completions.

``extract_answer(text, mode)`` pulls the final answer string out of a completion:

- ``raw``: the whole completion, stripped of surrounding whitespace.
- ``answer_tag``: the content of the *last* ``<answer>...</answer>`` block (stripped), or None.
- ``boxed``: the content of the *last* ``\\boxed{...}`` (balanced braces, nesting allowed), or None.
- ``last_number``: the last integer / decimal / fraction-like number (``-3``, ``1,234.5``,
  ``3/4``, ``.5``, ``1e-3``), with thousands-separator commas removed, or None.
"""

from __future__ import annotations

import re
from typing import Optional

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
