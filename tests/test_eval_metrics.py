"""pass@k, maj@k, answer normalization, distinct-n and bootstrap CIs against hand-worked numbers."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from postrl.eval.metrics import (
    bootstrap_ci,
    distinct_correct_answers,
    distinct_n,
    maj_at_k,
    majority_vote,
    mean_with_ci,
    normalize_answer,
    parse_ks,
    pass_at_k,
    pass_at_k_exact,
    powers_of_two_up_to,
)


# ----------------------------------------------------------------------------------------------- pass@k

@pytest.mark.parametrize("n,c,k,expected", [
    # n=5, c=2, k=2: C(3,2)/C(5,2) = 3/10, so pass@2 = 7/10.
    #   product form: (1 - 2/4) * (1 - 2/5) = 1/2 * 3/5 = 3/10 -> 1 - 3/10 = 0.7
    (5, 2, 2, Fraction(7, 10)),
    # n=4, c=1, k=1: 1 - C(3,1)/C(4,1) = 1 - 3/4 = 1/4 (pass@1 is just c/n)
    (4, 1, 1, Fraction(1, 4)),
    # n=10, c=3, k=5: C(7,5) = 21, C(10,5) = 252, 21/252 = 1/12 -> 11/12
    (10, 3, 5, Fraction(11, 12)),
    # n=6, c=4, k=3: only 2 wrong samples, every 3-subset holds a correct one -> 1
    (6, 4, 3, Fraction(1)),
    # n=8, c=1, k=4: 1 - C(7,4)/C(8,4) = 1 - 35/70 = 1/2 (= k/n for c = 1)
    (8, 1, 4, Fraction(1, 2)),
])
def test_pass_at_k_hand_worked(n, c, k, expected):
    assert pass_at_k_exact(n, c, k) == expected
    assert pass_at_k(n, c, k) == pytest.approx(float(expected), abs=1e-15)


def test_pass_at_k_equals_brute_force_over_all_k_subsets():
    """For n <= 10, every c and k: the fraction of k-subsets of the n samples with a correct one."""
    for n in range(1, 11):
        for c in range(n + 1):
            correct = set(range(c))  # which samples are correct does not matter, only how many
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                hits = sum(1 for s in subsets if correct.intersection(s))
                brute = Fraction(hits, len(subsets))
                assert pass_at_k_exact(n, c, k) == brute, (n, c, k)
                assert pass_at_k(n, c, k) == pytest.approx(float(brute), rel=1e-12, abs=1e-15), (n, c, k)


def test_pass_at_k_edge_cases():
    assert pass_at_k(7, 0, 3) == 0.0  # c = 0: never solved
    assert pass_at_k(7, 7, 3) == 1.0  # c = n: always solved
    assert pass_at_k(7, 1, 7) == 1.0  # k = n with one correct sample: the full set holds it
    assert pass_at_k(7, 0, 7) == 0.0  # k = n and nothing correct
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0


@pytest.mark.parametrize("args,match", [
    ((4, 1, 5), r"k <= n: k = 5 but only n = 4"),
    ((4, 5, 2), r"c \(correct samples\) = 5 cannot exceed n"),
    ((4, -1, 2), r"c \(correct samples\) must be >= 0"),
    ((4, 1, 0), r"k must be >= 1"),
    ((0, 0, 1), r"n \(samples per problem\) must be >= 1"),
    ((4.0, 1, 2), r"n \(samples per problem\) must be an integer"),
    ((4, 1, True), r"k must be an integer"),
])
def test_pass_at_k_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(*args)


def test_pass_at_k_numerically_stable_for_n_1024_k_512():
    n, k = 1024, 512
    for c in (1, 2, 3, 10, 100, 400, 511, 512, 513, 1024):
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k)) if n - c >= k else Fraction(1)
        got = pass_at_k(n, c, k)
        assert math.isfinite(got)
        assert got == pytest.approx(float(exact), rel=1e-12, abs=1e-300), c
    assert pass_at_k(n, 1, k) == 0.5  # c = 1: k / n exactly
    # the small end: 1 - pass@k = C(n-c, k)/C(n, k) must keep its relative precision too
    c = 2
    miss_exact = Fraction(math.comb(n - c, k), math.comb(n, k))  # = (512 * 511) / (1024 * 1023)
    assert miss_exact == Fraction(512 * 511, 1024 * 1023)
    assert 1 - pass_at_k(n, c, k) == pytest.approx(float(miss_exact), rel=1e-12)


# ----------------------------------------------------------------------------------------------- answers

@pytest.mark.parametrize("raw,expected", [
    (" $\\boxed{1,234}$. ", "1234"),
    ("2.50", "5/2"),
    ("\\frac{6}{4}", "3/2"),
    ("6/4", "3/2"),
    ("-0", "0"),
    ("3.0", "3"),
    ("1e3", "1000"),
    ("  Yes. ", "yes"),
    ("\\text{No}", "no"),
    ("x = 2", "x=2"),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("1,2", "1,2"),  # not a thousands separator: kept as a list
    ("", None),
    ("   ", None),
    (None, None),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_majority_vote_ties_go_to_the_first_occurrence():
    assert majority_vote(["3", "4", "4", "3"]) == ("3", 0)  # 2-2 tie: "3" appears first
    assert majority_vote(["4", "3", "3", "4"]) == ("4", 0)
    assert majority_vote([None, "5", None, "7", "7"]) == ("7", 3)  # abstentions never win
    assert majority_vote([None, None]) == (None, None)
    assert majority_vote(["a", "b", "c"]) == ("a", 0)  # all tied


def test_maj_at_k_tie_breaking_and_normalized_votes():
    # k = n = 4: "4" and "3" tie 2-2; "4" comes first and is wrong -> 0; reversed order -> 1
    assert maj_at_k(["4", "3", "3", "4"], [False, True, True, False], 4) == 0.0
    assert maj_at_k(["3", "4", "4", "3"], [True, False, False, True], 4) == 1.0
    # normalization merges "0.5", "1/2" and "\frac{1}{2}" into one vote that beats "2" twice
    raw = ["2", "0.5", "2", "1/2", "\\frac{1}{2}"]
    answers = [normalize_answer(a) for a in raw]
    assert maj_at_k(answers, [False, True, False, True, True], 5) == 1.0
    assert maj_at_k([None, None, None], [False, False, False], 3) == 0.0  # no answer at all is wrong


def test_maj_at_k_enumerates_small_subset_spaces_exactly():
    # n=4, k=2, answers a a b c, only "a" correct. The 6 pairs:
    #   {a,a}: a ok | {a,b}: tie -> a ok | {a,c}: tie -> a ok | {a,b}: ok | {a,c}: ok | {b,c}: tie -> b wrong
    # -> 5/6
    assert maj_at_k(["a", "a", "b", "c"], [True, True, False, False], 2) == pytest.approx(5 / 6)
    # maj@1 is the fraction of correct samples (= pass@1)
    assert maj_at_k(["a", "b", "b", "c"], [True, False, False, True], 1) == pytest.approx(0.5)


def test_maj_at_k_monte_carlo_is_seeded():
    rng = np.random.default_rng(0)
    answers = [str(x) for x in rng.integers(0, 3, size=20)]
    correct = [a == "1" for a in answers]
    v1 = maj_at_k(answers, correct, 5, num_subsets=32, seed=3)  # C(20, 5) = 15504 > 32: sampled subsets
    assert v1 == maj_at_k(answers, correct, 5, num_subsets=32, seed=3)
    assert 0.0 <= v1 <= 1.0 and v1 * 32 == round(v1 * 32)
    assert maj_at_k(["7"] * 20, [True] * 20, 5) == 1.0
    with pytest.raises(ValueError, match="k <= n"):
        maj_at_k(["1", "2"], [True, False], 3)
    with pytest.raises(ValueError, match="2 answers but 1 correctness flags"):
        maj_at_k(["1", "2"], [True], 1)


# ----------------------------------------------------------------------------------------------- diversity

def test_distinct_n_by_hand():
    seqs = [[1, 2, 3], [1, 2, 4]]
    # unigrams 1 2 3 1 2 4: 4 distinct of 6
    assert distinct_n(seqs, 1) == pytest.approx(4 / 6)
    # bigrams (1,2) (2,3) (1,2) (2,4): 3 distinct of 4
    assert distinct_n(seqs, 2) == pytest.approx(3 / 4)
    # trigrams (1,2,3) (1,2,4): 2 of 2; n-grams never cross the boundary between the two completions
    assert distinct_n(seqs, 3) == 1.0
    assert math.isnan(distinct_n(seqs, 4))  # no 4-grams: undefined
    assert distinct_n([list("aaaa")], 1) == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="n-gram order"):
        distinct_n(seqs, 0)


def test_distinct_correct_answers():
    assert distinct_correct_answers(["1/2", "1/2", "3", None], [True, True, False, True]) == 1
    assert distinct_correct_answers(["1/2", "x", "1/2"], [True, True, True]) == 2
    assert distinct_correct_answers(["1", "2"], [False, False]) == 0


# ----------------------------------------------------------------------------------------------- bootstrap

def test_bootstrap_ci_contains_estimate_and_shrinks_with_more_problems():
    pattern = [0.0, 1.0, 1.0, 0.5]  # mean 0.625 at every size
    widths = []
    for reps in (5, 100):
        values = pattern * reps
        stat = mean_with_ci(values, num_resamples=2000, seed=0)
        lo, hi = stat["ci"]
        assert stat["value"] == pytest.approx(0.625)
        assert lo <= stat["value"] <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2  # 20x the problems: about sqrt(20) = 4.5x narrower


def test_bootstrap_ci_matches_the_normal_approximation_for_many_problems():
    values = [0.0, 1.0] * 200  # 400 Bernoulli(0.5) problems: SE = 0.5 / 20 = 0.025, 95% half-width ~ 0.049
    lo, hi = bootstrap_ci(values, num_resamples=4000, seed=1)
    assert (hi - lo) / 2 == pytest.approx(1.96 * 0.025, abs=0.006)
    assert bootstrap_ci(values, 500, seed=7) == bootstrap_ci(values, 500, seed=7)  # seeded


def test_bootstrap_ci_degenerate_inputs():
    assert bootstrap_ci([0.3], 100) == (pytest.approx(0.3), pytest.approx(0.3))
    assert bootstrap_ci([0.2, float("nan"), 0.2], 100) == (pytest.approx(0.2), pytest.approx(0.2))
    lo, hi = bootstrap_ci([], 100)
    assert math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError, match="level must be in"):
        bootstrap_ci([1.0], 10, level=95)


def test_parse_ks_and_default_grid():
    assert parse_ks("8, 1,2,2") == [1, 2, 8]
    with pytest.raises(ValueError, match="positive integers"):
        parse_ks("1,two")
    with pytest.raises(ValueError, match=">= 1"):
        parse_ks("0,1")
    assert powers_of_two_up_to(64) == [1, 2, 4, 8, 16, 32, 64]
    assert powers_of_two_up_to(10) == [1, 2, 4, 8, 10]
