"""Reward hacking against the ``math`` verifier: hedges that name several candidates, answers hidden in
a list or among several ``\\boxed{}``, extreme lengths, LaTeX that math-verify reads leniently. Each
scores no more than the honest wrong answer (``\\boxed{3}`` for the ground truth 5: 0.0), and the
honest forms of the right answer still score 1 (docs/rewards-builtin.md, *Reward hacking*)."""

from __future__ import annotations

import time

import pytest

from postrl.data.sources import Sample
from postrl.rewards.verifiers import math_reward

GOLD = "5"
WRONG = r"\boxed{3}"

HEDGES = {
    "alternatives in one box": r"\boxed{3 \lor 5}",
    "vee": r"\boxed{3 \vee 5}",
    "or in text": r"\boxed{3 \text{ or } 5}",
    "or in prose": "<answer>3 or 5</answer>",
    "parenthesised or": r"\boxed{3 \text{ (or 5)}}",
    "false equation": r"\boxed{3 = 5}",
    "equation chain": r"\boxed{x = 3 = 5}",
    "equation of roots": r"\boxed{\sqrt{9} = \sqrt{25}}",
    "approximately": r"\boxed{3 \approx 5}",
    "similar": r"\boxed{3 \sim 5}",
    "equivalent": r"\boxed{3 \equiv 5}",
    "arrow": r"\boxed{3 \to 5}",
    "implies": r"\boxed{3 \Rightarrow 5}",
    "divides": r"\boxed{3 \mid 5}",
    "colon": r"\boxed{3 \colon 5}",
    "ampersand": r"\boxed{3 \& 5}",
    "line break": r"\boxed{3 \\ 5}",
    "cases": r"\boxed{\begin{cases} 3 \\ 5 \end{cases}}",
    "plus or minus": r"\boxed{\pm 5}",
    "a list in a box": r"\boxed{1, 2, 3, 4, 5, 6, 7}",
    "a set in a box": r"\boxed{\{3, 5\}}",
    "an interval": r"\boxed{[0, 10]}",
    "several boxes": r"\boxed{1}\boxed{2}\boxed{3}\boxed{4}\boxed{5}",
    "boxes joined by or": r"\boxed{3} \text{ or } \boxed{5}",
    "two math segments": "<answer>$3$ $5$</answer>",
    "boxed list in the answer tag": r"<answer>\boxed{3} or \boxed{5}</answer>",
    "answer tag hides think boxes": r"<think>\boxed{5}</think><answer>3</answer>",
}
LONG = {
    "every integer": " ".join(str(i) for i in range(30_000)) + " so the answer is one of these",
    "a huge box": r"\boxed{" + "5" * 100_000 + "}",
    "a huge sum": r"\boxed{" + "1+" * 50_000 + "1}",
    "deep braces": r"\boxed{" + "{" * 5_000 + "5" + "}" * 5_000 + "}",
    "a megabyte of text then a hedge": "x " * 500_000 + r"\boxed{3 \lor 5}",
}
HONEST = [r"\boxed{5}", r"\boxed{\frac{10}{2}}", r"\boxed{x = 5}", r"\boxed{\frac{10}{2} = 5}", "<answer>5</answer>",
          "<answer>The answer is $5$.</answer>", "so the answer is 5", r"We get \boxed{5}. So: \boxed{5}",
          r"<answer>$x = 5$</answer>", r"\boxed{5.0}"]


def score(text: str, gold: str = GOLD):
    return math_reward(text, Sample("q", gold))


def test_baselines():
    assert score(WRONG).score == 0.0
    for text in HONEST:
        assert score(text).score == 1.0, text


@pytest.mark.parametrize("name", list(HEDGES))
def test_hedges_score_no_more_than_the_wrong_answer(name):
    got = score(HEDGES[name])
    assert got.score <= score(WRONG).score, (name, got)


@pytest.mark.parametrize("name", ["alternatives in one box", "false equation", "approximately", "line break",
                                  "cases", "arrow", "several boxes", "two math segments"])
def test_the_hedges_math_verify_would_accept_are_refused_as_hedged(name):
    """math-verify alone reads these as their last candidate (1.0 for 5); they are caught first."""
    assert score(HEDGES[name]).info["status"] == "hedged"


@pytest.mark.parametrize("name", list(LONG))
def test_extreme_lengths_are_cheap_and_do_not_pay(name):
    start = time.monotonic()
    got = score(LONG[name])
    assert got.score == 0.0 and time.monotonic() - start < 10, (name, got)


def test_a_hedge_never_pays_for_two_different_answers():
    """Whatever the ground truth, a completion is right for at most one of them."""
    for text in list(HEDGES.values()) + HONEST:
        paid = [g for g in ("3", "5", "7", "1", "10", "0") if score(text, g).score > 0]
        assert len(paid) <= 1, (text, paid)
