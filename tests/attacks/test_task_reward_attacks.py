"""Reward hacking against the default ``task`` reward of math data (a JSONL source scored by math-verify): the
hedges of the ``math`` verifier's suite score no more than the honest wrong answer here too, since both use
the one :func:`postrl.data.answers.hedge_reason`."""

from __future__ import annotations

import json

import pytest

from postrl.data.sources import JsonlSource
from tests.attacks.test_math_attacks import GOLD, HEDGES, WRONG


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("task") / "math.jsonl"
    path.write_text(json.dumps({"prompt": "What is 2 + 3?", "answer": GOLD}) + "\n")
    return JsonlSource(str(path), eval_path=str(path), train_size=0, eval_size=0, answer_extraction="boxed")


# "answer tag hides think boxes": with answer_extraction=boxed the last box anywhere *is* the answer, by the
# source's configuration (with answer_tag extraction the tag's content is scored instead), so it is no hedge here
@pytest.mark.parametrize("name", sorted(set(HEDGES) - {"answer tag hides think boxes"}))
def test_hedges_score_no_more_than_the_wrong_answer(source, name):
    sample = source.eval[0]
    baseline = source.score(WRONG, sample)
    assert source.score(HEDGES[name], sample) <= baseline, name


def test_honest_right_answers_still_pay(source):
    sample = source.eval[0]
    for text in (r"\boxed{5}", r"The sum is \boxed{5}.", r"\boxed{5.0}", r"\boxed{\frac{10}{2}}"):
        assert source.score(text, sample) == 1.0, text


def test_several_different_boxes_do_not_pay(source):
    assert source.score(r"\boxed{3} or maybe \boxed{5}", source.eval[0]) == 0.0
