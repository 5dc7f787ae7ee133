"""Built-in verifier rewards: math, format, length, exact_match, contains, regex."""

from __future__ import annotations

import time

import pytest

from postrl.config import RewardSpec, ScoringConfig
from postrl.data.sources import Sample
from postrl.rewards import RewardBatch, RewardPipeline, resolve_reward
from postrl.rewards.verifiers import (
    contains_reward,
    exact_match_reward,
    extract_final_answer,
    format_partial_credit,
    format_reward,
    length_reward,
    math_equal,
    math_reward,
    normalize_text,
    regex_reward,
    target_length_reward,
)

GARBAGE = "\x00\ufffd\U0001f4a5\u202e\ud7ff" * 50 + "ｚ̸̢͉" * 20
LONG = "All work and no play. " * 50_000  # ~1.1 MB


def S(answer="42", **metadata):
    return Sample(question="q", answer=answer, metadata=metadata, uid="u")


# ----- registration --------------------------------------------------------------------------------
@pytest.mark.parametrize("name, batched, parallel", [
    ("math", False, True), ("format", False, False), ("length", True, False),
    ("exact_match", False, False), ("contains", False, False), ("regex", False, True),
])
def test_registered_with_the_right_shape(name, batched, parallel):
    entry = resolve_reward(name)
    assert (entry.batched, entry.parallel) == (batched, parallel)


# ----- extraction ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, mode, expected", [
    ("so \\boxed{\\frac{\\sqrt{3}}{2}} done", "auto", "\\frac{\\sqrt{3}}{2}"),  # nested braces
    ("<think>maybe \\boxed{3}</think><answer>5</answer>", "auto", "5"),  # the answer tag wins over think
    ("<answer>it is \\boxed{7}</answer>", "auto", "7"),  # boxed inside the tag
    ("first 3 then 4.5", "auto", "4.5"),  # last number fallback
    ("no digits here", "auto", None),
    ("<answer>  </answer>", "auto", None),
    ("", "auto", None),
    ("\\boxed{1} and \\boxed{2}", "boxed", "2"),
    ("\\boxed{unclosed", "boxed", None),
    ("<answer>x</answer>", "answer_tag", "x"),
    ("  hi  ", "raw", "hi"),
    ("1,234 apples", "last_number", "1234"),
])
def test_extract_final_answer(text, mode, expected):
    assert extract_final_answer(text, mode) == expected


def test_extract_final_answer_rejects_bad_modes():
    with pytest.raises(ValueError, match="valid: auto, raw, answer_tag, boxed, last_number"):
        extract_final_answer("x", "last_word")
    with pytest.raises(ValueError, match="fallback"):
        extract_final_answer("x", "auto", fallback="auto")


# ----- math ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("gold, pred", [
    ("1/2", "0.5"), ("0.5", "\\frac{1}{2}"), ("\\frac{1}{2}", "\\dfrac{1}{2}"), ("\\frac12", "1/2"),
    ("\\frac{3}{4}", "0.75"), ("1.5", "3/2"), ("3", "3.0"), ("1000", "1,000"), ("-3", "−3"),
    ("0.5", "50\\%"), ("50%", "0.5"), ("\\{1,2\\}", "\\{2,1\\}"), ("x^2+1", "1+x^2"),
    ("(1,2)", "(1, 2)"), ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"), ("10^{3}", "1000"),
    ("72", "\\$72"), ("72", "72 \\text{ dollars}"), ("x=2", "2"), ("5", "$5$"), ("50", "50\\%"),
])
def test_math_equivalences(gold, pred):
    assert math_equal(gold, pred)


@pytest.mark.parametrize("gold, pred", [
    ("3", "4"), ("1/2", "0.4"), ("(1,2)", "(2,1)"), ("2", "2.0001"), ("x^2+1", "2"), ("\\pi", "3.14"),
    ("72", "72 dollars"),  # bare words are read as LaTeX symbols: units belong in \text{}
])
def test_math_non_equivalences(gold, pred):
    assert not math_equal(gold, pred)


def test_math_reward_statuses():
    r = math_reward("Thinking... \\boxed{\\dfrac{1}{2}}", S("0.5"))
    assert (r.score, r.info["status"], r.info["extracted"]) == (1.0, "ok", "\\dfrac{1}{2}")
    r = math_reward("<answer>\\boxed{3}</answer>", S("4"))
    assert (r.score, r.info["status"]) == (0.0, "wrong_answer")
    for text in ["", "I do not know", GARBAGE, "<answer></answer>"]:
        r = math_reward(text, S("4"))
        assert (r.score, r.info["status"]) == (0.0, "no_answer"), text[:20]
    r = math_reward("\\boxed{" + "1+" * 600 + "1}", S("601"), max_answer_chars=1000)
    assert (r.score, r.info["status"]) == (0.0, "too_long")
    # last-number fallback and explicit modes
    assert math_reward("so the total is 1,234.", S("1234")).score == 1.0
    assert math_reward("<answer>7</answer> \\boxed{8}", S("7"), extract="answer_tag").score == 1.0
    assert math_reward("<answer>7</answer> \\boxed{8}", S("7"), extract="boxed").score == 0.0


def test_math_reward_reads_prose_in_the_answer_tag():
    assert math_reward("<answer>The answer is 42</answer>", S("42")).score == 1.0
    assert math_reward("<answer>So the answer is $\\frac{84}{2}$.</answer>", S("42")).score == 1.0
    assert math_reward("<answer>The answer is 41</answer>", S("42")).info["status"] == "wrong_answer"
    assert math_reward("<answer>1+x^2</answer>", S("2")).score == 0.0  # an expression, not its last number


def test_math_reward_on_very_long_text_is_fast():
    t = time.perf_counter()
    assert math_reward(LONG + " the answer is 42", S("42")).score == 1.0
    assert math_reward(LONG, S("42")).info["status"] == "no_answer"
    assert time.perf_counter() - t < 5.0


def test_math_reward_rejects_bad_arguments():
    with pytest.raises(ValueError, match="extract='last_word' is not a valid"):
        math_reward("1", S("1"), extract="last_word")
    with pytest.raises(ValueError, match="empty ground-truth"):
        math_reward("1", S("  "))
    with pytest.raises(ValueError, match="max_answer_chars"):
        math_reward("1", S("1"), max_answer_chars=0)


def test_math_runs_in_the_process_pool_with_statuses():
    """parallel=True: the function is pickled to a worker; statuses come back."""
    pipe = RewardPipeline([RewardSpec("math", kwargs={"extract": "boxed"})],
                          scoring=ScoringConfig(workers=1, timeout_s=60))
    try:
        res = pipe(["\\boxed{\\frac{1}{2}}", "\\boxed{2}", "nothing"], [S("0.5")] * 3)
    finally:
        pipe.close()
    assert res.components["math"] == [1.0, 0.0, 0.0]
    assert res.statuses == {("math", "ok"): 1, ("math", "wrong_answer"): 1, ("math", "no_answer"): 1}
    assert not res.errors


# ----- format --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("<think>reason</think><answer>5</answer>", 1.0),
    ("  <think>\nreason\n</think>\n\n<answer> 5 </answer>\n", 1.0),  # whitespace around/between blocks
    ("<think></think><answer></answer>", 0.0),  # empty blocks: a degenerate structure (require_content)
    ("<think> ... </think><answer>5</answer>", 0.0),  # a block of punctuation only
    ("<think>x</think><answer>5</answer>", 1.0),  # one letter or digit is content
    ("<answer>5</answer><think>r</think>", 0.0),  # wrong order
    ("<think>r</think>text<answer>5</answer>", 0.0),  # text between the blocks
    ("<think>r</think><answer>5</answer> bye", 0.0),  # text after
    ("<think>r</think><answer>5</answer><answer>6</answer>", 0.0),  # a second answer
    ("<think>a <answer>4</answer></think><answer>5</answer>", 0.0),  # a tag inside a block
    ("The answer is 5", 0.0),
    ("", 0.0),
    (GARBAGE, 0.0),
])
def test_format_full_structure(text, expected):
    assert format_reward(text, S()).score == expected


@pytest.mark.parametrize("text, counted", [
    ("<think>r</think><answer>5</answer>", 4),
    ("intro <think>r</think> x <answer>5</answer> outro", 4),  # all markers once, in order
    ("<think>r</think> the answer is 5", 2),
    ("<answer>5</answer><think>r</think>", 2),  # <think>, </think> counted; the answer markers are earlier
    ("<think>r</think><think>s</think><answer>5</answer>", 2),  # repeated think markers never count
    ("</answer><answer>", 1),  # </answer> comes before <answer>
    ("nothing", 0),
])
def test_format_partial_credit_by_hand(text, counted):
    assert format_partial_credit(text) == counted / 4


def test_format_empty_blocks_need_require_content_off():
    assert format_reward("<think></think><answer></answer>", S()).info["status"] == "empty_block"
    assert format_reward("<think></think><answer></answer>", S(), partial=True).score == 0.0  # no partial credit
    assert format_reward("<think></think><answer></answer>", S(), require_content=False).score == 1.0
    assert format_reward("<a></a>", S(), pattern=r"<a></a>").score == 1.0  # a user pattern is taken as written


def test_format_partial_reward_and_statuses():
    r = format_reward("<think>r</think> the answer is 5", S(), partial=True)
    assert (r.score, r.info["status"]) == (pytest.approx(0.5 * 2 / 4), "partial")
    r = format_reward("x <think>r</think><answer>5</answer>", S(), partial=True, partial_max=0.8)
    assert r.score == pytest.approx(0.8)
    assert format_reward("nothing", S(), partial=True).info["status"] == "wrong_format"
    assert format_reward("<think>r</think><answer>5</answer>", S(), partial=True).info["status"] == "ok"


def test_format_prefix_tags_and_pattern():
    # the chat template opened <think> in the prompt
    assert format_reward("reason</think><answer>5</answer>", S(), prefix="<think>").score == 1.0
    assert format_reward("<reasoning>r</reasoning><answer>5</answer>", S(), tags=["reasoning", "answer"]).score == 1.0
    assert format_reward("<reasoning>r</reasoning><answer>5</answer>", S()).score == 0.0
    assert format_reward("Final: 12", S(), pattern=r"Final: \d+").score == 1.0
    assert format_reward("x Final: 12 y", S(), pattern=r"Final: \d+").score == 0.0  # fullmatch
    assert format_reward("x Final: 12 y", S(), pattern=r"Final: \d+", match="search").score == 1.0


def test_format_rejects_bad_arguments_and_is_fast_on_long_text():
    with pytest.raises(ValueError, match="not a valid regex"):
        format_reward("x", S(), pattern="(")
    with pytest.raises(ValueError, match="not a valid tag name"):
        format_reward("x", S(), tags=["a b"])
    with pytest.raises(ValueError, match="non-empty list"):
        format_reward("x", S(), tags="think")
    with pytest.raises(ValueError, match="partial_max"):
        format_reward("x", S(), partial_max=2)
    t = time.perf_counter()
    assert format_reward("<think>" + LONG + "</think><answer>5</answer>", S()).score == 1.0
    assert format_reward(LONG, S(), partial=True).score == 0.0
    assert time.perf_counter() - t < 5.0


# ----- length --------------------------------------------------------------------------------------
def _batch(lengths, samples=None, texts=None):
    n = len(lengths)
    return RewardBatch(prompts=[""] * n, completions=texts or ["x" * k for k in lengths],
                       completion_ids=[list(range(k)) for k in lengths], samples=samples or [S()] * n)


def test_length_overlong_matches_dapo_eq13_by_hand():
    # L_max = 10, L_cache = 4: 0 up to 6 tokens, (6 - |y|)/4 in (6, 10], -1 beyond
    out = length_reward(_batch([0, 5, 6, 7, 8, 10, 12]), max_len=10, buffer=4)
    assert [o.score for o in out] == pytest.approx([0.0, 0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    assert [o.info["status"] for o in out] == ["ok", "ok", "ok", "in_buffer", "in_buffer", "in_buffer", "overlong"]
    out = length_reward(_batch([8, 12]), max_len=10, buffer=4, penalty=0.5)
    assert [o.score for o in out] == pytest.approx([-0.25, -0.5])


def test_length_units_and_missing_ids():
    batch = RewardBatch(prompts=["", ""], completions=["a b c", "a " * 20], completion_ids=[[], []],
                        samples=[S(), S()])
    with pytest.raises(ValueError, match="unit='tokens' needs the completion token ids"):
        length_reward(batch, max_len=10, buffer=2)
    out = length_reward(batch, unit="words", max_len=10, buffer=2)  # 3 words, 20 words
    assert [o.score for o in out] == [0.0, -1.0]
    out = length_reward(batch, unit="chars", max_len=10, buffer=5)  # 5 chars, 40 chars
    assert [o.score for o in out] == [0.0, -1.0]
    with pytest.raises(ValueError, match="valid: tokens, chars, words"):
        length_reward(batch, unit="bytes", max_len=10, buffer=2)
    with pytest.raises(ValueError, match="needs max_len"):
        length_reward(_batch([1]))
    with pytest.raises(ValueError, match="overlong buffer"):
        length_reward(_batch([1]), max_len=4, buffer=5)
    assert length_reward(_batch([]), max_len=4, buffer=2) == []


@pytest.mark.parametrize("length, target, shape, expected", [
    (10, 10, "linear", 1.0), (5, 10, "linear", 0.5), (15, 10, "linear", 0.5), (20, 10, "linear", 0.0),
    (35, 10, "linear", 0.0), (0, 10, "linear", 0.0), (15, 10, "l1", -0.05), (10, 10, "l1", 0.0),
])
def test_target_length_reward_by_hand(length, target, shape, expected):
    assert target_length_reward(length, target, shape, alpha=0.01) == pytest.approx(expected)


def test_length_target_mode_uses_metadata_first():
    samples = [S(target_length=4), S(), S()]
    out = length_reward(_batch([2, 8, 10], samples), mode="target", target=10)
    assert [o.score for o in out] == pytest.approx([0.5, 0.8, 1.0])
    assert [o.info["status"] for o in out] == ["under", "under", "exact"]
    out = length_reward(_batch([12]), mode="target", target=10, shape="l1")  # default alpha 0.0003
    assert out[0].score == pytest.approx(-0.0006) and out[0].info["status"] == "over"
    with pytest.raises(ValueError, match="needs a target"):
        length_reward(_batch([3]), mode="target")
    with pytest.raises(ValueError, match="target must be > 0"):
        target_length_reward(3, 0)
    with pytest.raises(ValueError, match="valid: linear, l1"):
        length_reward(_batch([3]), mode="target", target=3, shape="quadratic")
    with pytest.raises(ValueError, match="valid: overlong, target"):
        length_reward(_batch([3]), mode="short")


def test_length_through_the_pipeline_uses_token_ids():
    pipe = RewardPipeline([RewardSpec("length", kwargs={"max_len": 10, "buffer": 4})])
    res = pipe(["a", "b"], [S(), S()], completion_ids=[[1] * 3, [1] * 8])
    assert res.components["length"] == pytest.approx([0.0, -0.5])
    assert res.statuses == {("length", "ok"): 1, ("length", "in_buffer"): 1}


# ----- exact match / contains / regex --------------------------------------------------------------
@pytest.mark.parametrize("text, answer, kwargs, expected", [
    ("Paris", "Paris", {}, 1.0),
    ("  Paris \n", "Paris", {}, 1.0),  # strip
    ("New   York", "New York", {}, 1.0),  # whitespace collapsed by default
    ("New   York", "New York", {"collapse_whitespace": False}, 0.0),
    ("paris", "Paris", {}, 0.0),
    ("paris", "Paris", {"ignore_case": True}, 1.0),
    ("STRASSE", "straße", {"ignore_case": True}, 1.0),  # casefold
    ("１２", "12", {"unicode_nfkc": True}, 1.0),  # full-width digits
    ("１２", "12", {}, 0.0),
    ("<think>London?</think><answer>Paris</answer>", "Paris", {}, 1.0),  # auto: the answer tag
    ("<answer>Paris</answer>", "Paris", {"extract": "raw"}, 0.0),
    ("Paris is the capital", "Paris", {}, 0.0),
])
def test_exact_match(text, answer, kwargs, expected):
    assert exact_match_reward(text, S(answer), **kwargs).score == expected


def test_exact_match_statuses_references_and_malformed():
    assert exact_match_reward("", S("a")).info["status"] == "no_answer"
    assert exact_match_reward(GARBAGE, S("a")).info["status"] == "wrong_answer"
    assert exact_match_reward(LONG, S("a")).score == 0.0
    sample = S("Paris", aliases=["Paris, France", "Lutetia"])
    assert exact_match_reward("Lutetia", sample, references_key="aliases").score == 1.0
    assert exact_match_reward("Paris", sample, references_key="aliases").score == 0.0
    with pytest.raises(ValueError, match="no such metadata key"):
        exact_match_reward("x", S("a"), references_key="aliases")
    assert normalize_text("  A\t b  ", ignore_case=True, collapse_whitespace=True) == "a b"


def test_contains():
    assert contains_reward("The capital is Paris.", S("Paris")).info["status"] == "ok"
    assert contains_reward("The capital is paris.", S("Paris")).score == 0.0
    assert contains_reward("The capital is paris.", S("Paris"), ignore_case=True).score == 1.0
    assert contains_reward("answer: 123", S("12")).score == 1.0
    r = contains_reward("answer: 123", S("12"), whole_word=True)
    assert (r.score, r.info["status"]) == (0.0, "not_found")
    assert contains_reward("answer: 12.", S("12"), whole_word=True).score == 1.0
    assert contains_reward("", S("12")).info["status"] == "no_answer"
    assert contains_reward(GARBAGE, S("12")).score == 0.0
    assert contains_reward(LONG + " 12", S("12"), whole_word=True).score == 1.0
    with pytest.raises(ValueError, match="empty ground truth"):
        contains_reward("x", S("  "))


def test_regex():
    assert regex_reward("The answer is 1+1.", S("1+1"), pattern=r"answer is {answer}\.").score == 1.0
    assert regex_reward("The answer is 11.", S("1+1"), pattern=r"answer is {answer}\.").score == 0.0  # escaped
    sample = S(rx=r"[A-Z]{2}-\d{3}")
    assert regex_reward("id: AB-123", sample, pattern_key="rx").score == 1.0
    assert regex_reward("id: AB-123", sample, pattern_key="rx", match="fullmatch").score == 0.0
    assert regex_reward("ab-123", sample, pattern_key="rx", match="fullmatch", ignore_case=True).score == 1.0
    r = regex_reward("nope", sample, pattern_key="rx")
    assert (r.score, r.info["status"]) == (0.0, "no_match")
    assert regex_reward("", sample, pattern_key="rx").info["status"] == "no_answer"
    assert regex_reward(GARBAGE, sample, pattern_key="rx").score == 0.0
    assert regex_reward(LONG + "AB-123", sample, pattern_key="rx").score == 1.0
    with pytest.raises(ValueError, match="no pattern"):
        regex_reward("x", S())
    with pytest.raises(ValueError, match="not a valid regex"):
        regex_reward("x", S(), pattern="[")
    with pytest.raises(ValueError, match="'search', 'fullmatch'"):
        regex_reward("x", S(), pattern="x", match="match")


def test_math_timeout_is_a_status(monkeypatch):
    import math_verify
    from math_verify.errors import TimeoutException

    def slow_parse(*args, **kwargs):
        raise TimeoutException("Operation timed out!")

    monkeypatch.setattr(math_verify, "parse", slow_parse)
    r = math_reward("\\boxed{1}", S("a gold never parsed before 917"))
    assert (r.score, r.info["status"]) == (0.0, "timeout")
