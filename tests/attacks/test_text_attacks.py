"""Reward hacking against ``format``, ``length``, ``exact_match``, ``contains`` and ``regex``.

Attacks that these verifiers defend score no more than the honest wrong completion. Two families cannot
be defended in principle, and the tests say so by showing the documented mitigation working
(docs/rewards-builtin.md, *Reward hacking*): a ``length`` reward pays for length, whatever fills it;
``contains`` and a ``regex`` in ``search`` mode pay for a completion that lists every candidate.
"""

from __future__ import annotations

import pytest

from postrl.data.sources import Sample
from postrl.rewards.base import RewardBatch
from postrl.rewards.verifiers import contains_reward, exact_match_reward, format_reward, length_reward, regex_reward

HONEST_WRONG = "<think>2 + 2 is 5, I think.</think><answer>5</answer>"  # well formed, wrong: format pays 1.0


def S(answer="4", **metadata):
    return Sample("What is 2 + 2?", answer, metadata=metadata)


# ----- format ----------------------------------------------------------------------------------------------
DEGENERATE = {
    "empty blocks": "<think></think><answer></answer>",
    "whitespace blocks": "<think>  \n </think>\n<answer>\t</answer>",
    "punctuation blocks": "<think>...</think><answer>.</answer>",
    "zero-width characters": "<think>\u200b\u200b</think><answer>\u200b</answer>",
    "symbols only": "<think>---***</think><answer>!?</answer>",
    "nested tags": "<think><answer>4</answer></think><answer>4</answer>",
    "upper-case tags": "<THINK>x</THINK><ANSWER>4</ANSWER>",
    "tags repeated": "<think>x</think><answer>4</answer>" * 3,
    "unclosed": "<think>x<answer>4",
    "markers only, empty": "<think></think> <answer></answer>" + " " * 1000,
}


@pytest.mark.parametrize("name", list(DEGENERATE))
@pytest.mark.parametrize("partial", [False, True])
def test_degenerate_structures_score_no_more_than_the_honest_wrong_answer(name, partial):
    baseline = format_reward(HONEST_WRONG, S(), partial=partial).score
    assert baseline == 1.0
    got = format_reward(DEGENERATE[name], S(), partial=partial)
    assert got.score <= baseline, got
    if name in ("empty blocks", "whitespace blocks", "punctuation blocks", "zero-width characters", "symbols only"):
        assert got.score == 0.0 and got.info["status"] == "empty_block"  # they match the pattern, without content


# ----- length --------------------------------------------------------------------------------------------------
def _length(texts, **kw):
    batch = RewardBatch([""] * len(texts), texts, [[1] * len(t.split()) for t in texts], [S() for _ in texts])
    return [s.score for s in length_reward(batch, **kw)]


def test_length_rewards_pay_for_length_only_so_filler_equals_content():
    """Cannot be defended in principle: a length reward sees only the length. Filler scores exactly what an
    honest completion of the same length scores (never more), and an empty completion never more than
    an honest short one; the mitigation is to pair it with a correctness reward (docs)."""
    honest = "The sum of two and two is four so the answer is 4"  # 13 words
    filler = " ".join(["a"] * len(honest.split()))
    for kw in ({"mode": "target", "target": 13, "unit": "words"}, {"mode": "overlong", "max_len": 12, "buffer": 4},
               {"mode": "target", "target": 20, "shape": "l1"}):
        h, f, e = _length([honest, filler, ""], **kw)
        assert f == h and e <= max(h, 0.0), kw


# ----- exact_match ---------------------------------------------------------------------------------------------
EXACT = {
    "several answers in the tag": "<answer>4 or 5</answer>",
    "a list": "<answer>3, 4, 5</answer>",
    "several tags, wrong last": "<answer>4</answer><answer>5</answer>",
    "confusable digit": "<answer>\u0664</answer>",  # Arabic-Indic four
    "zero-width inside": "<answer>4\u200b</answer>",
    "full-width digit": "<answer>\uff14</answer>",  # NFKC would map it to 4: off by default
    "answer as a substring": "<answer>44</answer>",
    "answer with a tail": "<answer>4, but maybe 5</answer>",
}


@pytest.mark.parametrize("name", list(EXACT))
def test_exact_match_attacks(name):
    baseline = exact_match_reward("<answer>5</answer>", S()).score
    assert baseline == 0.0 and exact_match_reward("<answer>4</answer>", S()).score == 1.0
    assert exact_match_reward(EXACT[name], S()).score <= baseline, name


# ----- contains and regex: enumeration cannot be defended in principle ---------------------------------------
ENUMERATION = " ".join(str(i) for i in range(1000))


def test_contains_pays_for_enumeration_and_the_mitigations_stop_it():
    assert contains_reward("I think it is 5", S()).score == 0.0  # the honest wrong answer
    assert contains_reward(ENUMERATION, S()).score == 1.0  # the limitation, as documented
    # mitigation 1: an exact match on an extracted answer
    assert exact_match_reward(f"<answer>{ENUMERATION}</answer>", S()).score == 0.0
    # mitigation 2: look only inside the answer tag, whole words
    tagged = contains_reward(f"{ENUMERATION} <answer>5</answer>", S(), extract="answer_tag", whole_word=True)
    assert tagged.score == 0.0
    assert contains_reward("so <answer>4</answer>", S(), extract="answer_tag", whole_word=True).score == 1.0
    assert contains_reward("<answer>14</answer>", S(), extract="answer_tag", whole_word=True).score == 0.0


def test_regex_search_pays_for_enumeration_and_fullmatch_stops_it():
    pattern = "The answer is {answer}\\."
    listing = " ".join(f"The answer is {i}." for i in range(10))
    assert regex_reward("The answer is 5.", S(), pattern=pattern).score == 0.0
    assert regex_reward(listing, S(), pattern=pattern).score == 1.0  # the limitation, as documented
    assert regex_reward(listing, S(), pattern=pattern, match="fullmatch").score == 0.0
    assert regex_reward("The answer is 4.", S(), pattern=pattern, match="fullmatch").score == 1.0
