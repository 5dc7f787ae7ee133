"""BLEU on token ids: hand-worked values, equality with NLTK and sacrebleu on a real corpus (docstrings
of the Python standard library, tokenized to word ids and to character ids), input formats, bad input,
and the ``bleu`` reward."""

from __future__ import annotations

import logging
import math
import random
import re
import warnings

import pytest
import torch

from postrl.config import RewardSpec
from postrl.data.sources import Sample
from postrl.models.tiny import build_char_tokenizer
from postrl.rewards import RewardPipeline
from postrl.rewards.base import RewardBatch, RewardContext
from postrl.rewards.bleu import BleuReward, sentence_bleu_ids

nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
sacrebleu = pytest.importorskip("sacrebleu")
logging.getLogger("sacrebleu").setLevel(logging.ERROR)  # its "enable effective_order" advice, once per call

@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one thread avoids oversubscription on a shared machine (conftest restores the count)."""
    torch.set_num_threads(1)


NLTK_METHODS = ("none", "method1", "method2", "method3", "method4")
SACRE_METHODS = ("none", "floor", "add-k", "exp")


def bleu(cands, refs, **kw) -> list[float]:
    return sentence_bleu_ids(cands, refs, **kw).tolist()


# ----- hand-worked values ----------------------------------------------------------------------------------------
def test_clipping_and_brevity_penalty_by_hand():
    # "the the the the" vs "the cat": the unigram count is clipped at 1 -> p1 = 1/4; c = 4 > r = 2 -> BP = 1
    assert bleu([[1, 1, 1, 1]], [[1, 2]], max_n=1) == [0.25]
    # p1 = 3/3, p2 = 2/2, c = 3 < r = 4 -> BP = exp(1 - 4/3)
    assert bleu([[1, 2, 3]], [[1, 2, 3, 4]], max_n=2)[0] == pytest.approx(math.exp(-1 / 3), abs=1e-15)


def test_multiple_references_max_count_and_closest_length_ties_to_shorter():
    # token 5 occurs at most twice in one reference -> p1 = 2/3; closest reference length is 3 -> BP = 1
    assert bleu([[5, 5, 5]], [[[5, 6], [5, 5, 7]]], max_n=1)[0] == pytest.approx(2 / 3, abs=1e-15)
    # c = 3, reference lengths 2 and 4 tie at distance 1: the shorter (2) is used, so BP = 1
    assert bleu([[1, 2, 3]], [[[1, 2], [1, 2, 3, 9]]], max_n=1) == [1.0]
    assert bleu([[1, 2, 3]], [[[1, 2, 3, 9]]], max_n=1)[0] == pytest.approx(math.exp(1 - 4 / 3), abs=1e-15)


CAND, REF = [1, 2, 3, 4], [1, 2, 4, 3]  # p1 = 4/4, p2 = 1/3, p3 = 0/2, p4 = 0/1, c = r = 4


@pytest.mark.parametrize("smoothing,expected", [
    ("none", 0.0),
    ("exp", (1 / 3 * 1 / 4 * 1 / 4) ** 0.25),  # zeros -> 1/(2*2), 1/(4*1)
    ("method3", (1 / 3 * 1 / 4 * 1 / 4) ** 0.25),
    ("floor", (1 / 3 * 0.1 / 2 * 0.1 / 1) ** 0.25),  # zeros -> 0.1 / t_n
    ("method1", (1 / 3 * 0.1 / 2 * 0.1 / 1) ** 0.25),
    ("add-k", (2 / 4 * 1 / 3 * 1 / 2) ** 0.25),  # n >= 2: (m + 1) / (t + 1)
    ("method2", (2 / 4 * 1 / 3 * 1 / 2) ** 0.25),
    ("method4", (1 / 3 * (math.log(4) / 20) ** 2) ** 0.25),  # zeros -> ln(4) / (2^j * 5 * t_n)
])
def test_smoothing_by_hand(smoothing, expected):
    assert bleu([CAND], [REF], smoothing=smoothing)[0] == pytest.approx(expected, abs=1e-15)


def test_short_candidate_edge_cases_by_hand():
    # two tokens: no 3- or 4-grams. Without effective order, 'none' gives 0; with it, p1 = p2 = 1 -> 1
    assert bleu([[1, 2]], [[1, 2]]) == [0.0]
    assert bleu([[1, 2]], [[1, 2]], effective_order=True) == [1.0]
    # NLTK method2 divides by max(1, t_n) + 1 = 2: p3 = p4 = 1/2 -> (1/4)^(1/4)
    assert bleu([[1, 2]], [[1, 2]], smoothing="method2")[0] == pytest.approx(0.25 ** 0.25, abs=1e-15)
    # sacrebleu add-k adds k to t_n = 0: p3 = p4 = 1/1 -> 1
    assert bleu([[1, 2]], [[1, 2]], smoothing="add-k") == [1.0]
    # no matching unigram: 0 whatever the smoothing; empty candidate: 0
    for s in NLTK_METHODS + SACRE_METHODS:
        assert bleu([[7, 8, 9], []], [[1, 2, 3], [1, 2]], smoothing=s) == [0.0, 0.0]


def test_references_of_one_candidate_never_match_another():
    assert bleu([[1, 2], [3, 4]], [[3, 4], [1, 2]], max_n=1) == [0.0, 0.0]
    assert bleu([[1, 2], [3, 4]], [[1, 2], [3, 4]], max_n=2) == [1.0, 1.0]
    big = 150_000  # ids of a large vocabulary
    assert bleu([[big, big + 1, 7]], [[big, big + 1, 8]], max_n=2)[0] == pytest.approx((2 / 3 * 1 / 2) ** 0.5)


def test_weights():
    # p1 = 1, p2 = 1/3: weights (0.25, 0.75) -> (1/3)^0.75
    assert bleu([CAND], [REF], max_n=2, weights=[0.25, 0.75])[0] == pytest.approx((1 / 3) ** 0.75, abs=1e-15)
    assert bleu([CAND], [REF], max_n=2, weights=[1.0, 0.0]) == [1.0]


# ----- equality with the reference implementations on a real corpus ----------------------------------------
def _stdlib_sentences() -> list[str]:
    import argparse
    import collections
    import difflib
    import heapq
    import json
    import logging as logging_module
    import subprocess
    import textwrap
    import unittest

    text = " ".join(m.__doc__ or "" for m in (json, argparse, collections, subprocess, textwrap, unittest, difflib,
                                                heapq, logging_module, json.JSONDecoder, collections.OrderedDict))
    text += " ".join((f.__doc__ or "") for f in (subprocess.run, textwrap.wrap, json.dumps, json.loads))
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text))]
    return [s for s in sentences if len(s.split()) >= 3]


def _word_ids(sentences: list[str], max_len: int = 60) -> list[list[int]]:
    vocab: dict[str, int] = {}
    return [[vocab.setdefault(w, len(vocab)) for w in re.findall(r"\w+|[^\w\s]", s.lower())][:max_len]
            for s in sentences]


def _corpus_pairs(seqs: list[list[int]], seed: int = 0) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Candidates and their references built from real sentences, covering the edge cases."""
    rng = random.Random(seed)
    vocab_size = max(max(s) for s in seqs) + 1
    cands, refs = [], []
    for i, ref in enumerate(seqs):
        kind = i % 10
        other = seqs[(i + 1) % len(seqs)]
        if kind == 0:
            cand = list(ref)  # identical
        elif kind == 1:  # ~25% of the words replaced
            cand = [rng.randrange(vocab_size) if rng.random() < 0.25 else t for t in ref]
        elif kind == 2:  # a span dropped
            a = rng.randrange(len(ref))
            cand = ref[:a] + ref[a + rng.randint(1, 4):]
        elif kind == 3:  # shorter than the n-gram order
            cand = ref[: rng.choice([1, 2, 3])]
        elif kind == 4:
            cand = list(other)  # another real sentence: few shared n-grams
        elif kind == 5:
            cand = [vocab_size + t for t in ref]  # shares no n-gram at all
        elif kind == 6:
            cand = []  # empty
        elif kind == 7:
            cand = [ref[0]] * len(ref) + ref[:2]  # repeats: clipping matters
        elif kind == 8:  # chunks swapped
            a = len(ref) // 2
            cand = ref[a:] + ref[:a]
        else:
            cand = ref + other[:3]  # longer than every reference
        these = [ref]
        if i % 3 == 1:
            these.append(other)
        if i % 4 == 2:
            these.append([t for t in ref if rng.random() < 0.7])
        cands.append(cand)
        refs.append(these)
    return cands, refs


@pytest.fixture(scope="module")
def word_corpus():
    seqs = _word_ids(_stdlib_sentences())
    assert len(seqs) >= 100
    return _corpus_pairs(seqs)


@pytest.fixture(scope="module")
def char_corpus():
    tok = build_char_tokenizer()
    sentences = [s.lower()[:120] for s in _stdlib_sentences()[:40]]
    return _corpus_pairs([tok.encode(s, add_special_tokens=False) for s in sentences], seed=1)


def _nltk(cands, refs, smoothing, effective_order, weights=(0.25, 0.25, 0.25, 0.25)):
    sf = nltk_bleu.SmoothingFunction()
    fn = getattr(sf, "method0" if smoothing == "none" else smoothing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [nltk_bleu.sentence_bleu(r, c, weights=weights, smoothing_function=fn, auto_reweigh=effective_order)
                for c, r in zip(cands, refs)]


def _sacre(cands, refs, smoothing, effective_order):
    metric = sacrebleu.BLEU(tokenize="none", smooth_method=smoothing, effective_order=effective_order)
    text = lambda ids: " ".join(map(str, ids))  # noqa: E731
    return [metric.sentence_score(text(c), [text(x) for x in r]).score / 100 for c, r in zip(cands, refs)]


@pytest.mark.parametrize("corpus", ["word_corpus", "char_corpus"])
@pytest.mark.parametrize("effective_order", [False, True])
@pytest.mark.parametrize("smoothing", NLTK_METHODS)
def test_equals_nltk_sentence_bleu(request, corpus, smoothing, effective_order):
    cands, refs = request.getfixturevalue(corpus)
    expected = _nltk(cands, refs, smoothing, effective_order)
    got = bleu(cands, refs, smoothing=smoothing, effective_order=effective_order)
    assert got == pytest.approx(expected, abs=1e-6, rel=0)
    assert 0 < sum(x > 0 for x in expected) < len(expected)  # the corpus has both matching and non-matching pairs


@pytest.mark.parametrize("corpus", ["word_corpus", "char_corpus"])
@pytest.mark.parametrize("effective_order", [False, True])
@pytest.mark.parametrize("smoothing", SACRE_METHODS)
def test_equals_sacrebleu_sentence_bleu(request, corpus, smoothing, effective_order):
    cands, refs = request.getfixturevalue(corpus)
    expected = _sacre(cands, refs, smoothing, effective_order)
    got = bleu(cands, refs, smoothing=smoothing, effective_order=effective_order)
    assert got == pytest.approx(expected, abs=1e-6, rel=0)


def test_equals_nltk_with_weights_and_other_orders(word_corpus):
    cands, refs = word_corpus
    for weights in ((0.5, 0.5), (0.1, 0.2, 0.7), (0.4, 0.3, 0.2, 0.1)):
        for smoothing in ("method1", "method3"):
            expected = _nltk(cands, refs, smoothing, False, weights=weights)
            got = bleu(cands, refs, max_n=len(weights), weights=list(weights), smoothing=smoothing)
            assert got == pytest.approx(expected, abs=1e-6, rel=0)


def test_equals_sacrebleu_sentence_bleu_defaults(word_corpus):
    cands, refs = word_corpus
    text = lambda ids: " ".join(map(str, ids))  # noqa: E731
    expected = [sacrebleu.sentence_bleu(text(c), [text(x) for x in r], tokenize="none").score / 100
                for c, r in zip(cands, refs)]
    assert bleu(cands, refs, smoothing="exp", effective_order=True) == pytest.approx(expected, abs=1e-6, rel=0)


# ----- input formats -----------------------------------------------------------------------------------------
def test_padded_tensors_equal_lists(word_corpus):
    cands, refs = word_corpus
    cands, refs = cands[:40], [r[0] for r in refs[:40]]
    expected = bleu(cands, refs, smoothing="exp")
    pad = lambda seqs: torch.nn.utils.rnn.pad_sequence([torch.tensor(s, dtype=torch.long) for s in seqs],  # noqa: E731
                                                      batch_first=True, padding_value=-7)
    got = sentence_bleu_ids(pad(cands), pad(refs), candidate_lengths=[len(c) for c in cands],
                            reference_lengths=[len(r) for r in refs], smoothing="exp")
    assert got.dtype == torch.float64 and got.tolist() == pytest.approx(expected, abs=1e-12)
    # [B, R, L] with R = 2: the second reference is the first one again (no change)
    three = torch.stack([pad(refs), pad(refs)], dim=1)
    lens = torch.tensor([[len(r), len(r)] for r in refs])
    got3 = sentence_bleu_ids(pad(cands), three, candidate_lengths=[len(c) for c in cands], reference_lengths=lens,
                             smoothing="exp")
    assert got3.tolist() == pytest.approx(expected, abs=1e-12)
    # 1-D tensors in lists, and references given as a single sequence per candidate
    as_tensors = bleu([torch.tensor(c, dtype=torch.long) for c in cands], [[torch.tensor(r)] for r in refs],
                      smoothing="exp")
    assert as_tensors == pytest.approx(expected, abs=1e-12)


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="references has 1 entries, candidates has 2"):
        sentence_bleu_ids([[1], [2]], [[1]])
    with pytest.raises(ValueError, match=r"references\[0\] is empty.*\[\[\]\]"):
        sentence_bleu_ids([[1]], [[]])
    assert bleu([[1]], [[[]]]) == [0.0]  # one empty reference is fine
    with pytest.raises(ValueError, match="must be >= 0"):
        sentence_bleu_ids([[1, -2]], [[1]])
    with pytest.raises(ValueError, match="is text"):
        sentence_bleu_ids(["a b c"], [[1]])
    with pytest.raises(ValueError, match="smoothing='laplace' is not known; valid: none, floor"):
        sentence_bleu_ids([[1]], [[1]], smoothing="laplace")
    with pytest.raises(ValueError, match="takes no smooth_value"):
        sentence_bleu_ids([[1]], [[1]], smoothing="exp", smooth_value=0.5)
    with pytest.raises(ValueError, match="weights has 3 entries but max_n=4"):
        sentence_bleu_ids([[1]], [[1]], weights=[0.3, 0.3, 0.4])
    with pytest.raises(ValueError, match="do not also give weights"):
        sentence_bleu_ids([[1]], [[1]], max_n=1, weights=[1.0], effective_order=True)
    with pytest.raises(ValueError, match="max_n must be an integer >= 1"):
        sentence_bleu_ids([[1]], [[1]], max_n=0)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 2\]"):
        sentence_bleu_ids(torch.tensor([[1, 2]]), [[1]], candidate_lengths=[3])
    with pytest.raises(ValueError, match="integer tensor"):
        sentence_bleu_ids(torch.tensor([[1.0, 2.0]]), [[1]])
    assert sentence_bleu_ids([], []).shape == (0,)


# ----- the reward -----------------------------------------------------------------------------------------------
def test_bleu_reward_references_from_metadata_answer_and_ids():
    tok = build_char_tokenizer()
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    eos = tok.eos_token_id
    completions = ["the cat sat", "a dog ran far", "xyz", "hello there"]
    samples = [Sample(question="q", answer="", metadata={"references": ["the cat sat down", "a cat sat"]}),
               Sample(question="q", answer="a dog ran fast"),
               Sample(question="q", answer="", metadata={"references": [enc("xyz")]}),
               Sample(question="q", answer="")]  # no reference at all
    batch = RewardBatch(prompts=["p"] * 4, completions=completions,
                        completion_ids=[enc(c) + [eos] for c in completions], samples=samples)
    scored = BleuReward(RewardContext(tokenizer=tok))(batch)
    assert [o.info["status"] if o is not None else None for o in scored] == ["ok", "ok", "ok", None]
    out = [o.score if o is not None else None for o in scored]
    text = lambda ids: " ".join(map(str, ids))  # noqa: E731

    def sb(c: str, rs: list[str]) -> float:
        return sacrebleu.sentence_bleu(text(enc(c)), [text(enc(r)) for r in rs], tokenize="none").score / 100

    assert out[0] == pytest.approx(sb("the cat sat", ["the cat sat down", "a cat sat"]), abs=1e-9)
    assert out[1] == pytest.approx(sb("a dog ran far", ["a dog ran fast"]), abs=1e-9)
    assert out[2] == 1.0  # EOS dropped from the completion, identical ids
    assert out[3] is None  # no references: a failure for this completion only
    assert out[0] == 1.0 and 0 < out[1] < 1  # every n-gram of out[0] is in its first reference; r = 9 < c


def test_bleu_reward_in_the_pipeline_and_options():
    tok = build_char_tokenizer()
    spec = RewardSpec(name="bleu", kwargs={"smoothing": "method2", "effective_order": False})
    pipe = RewardPipeline([spec], context=RewardContext(tokenizer=tok))
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    res = pipe(["abcd", "zz"], [Sample(question="q", answer="abcd"), Sample(question="q", answer="")],
               completion_ids=[enc("abcd"), enc("zz")])
    assert res.components["bleu"][0] == 1.0
    assert res.failed["bleu"] == [False, True]
    res = pipe(["abcd", "", "zz"], [Sample(question="q", answer="abcd")] * 3,
               completion_ids=[enc("abcd"), [tok.eos_token_id], enc("zz")])
    assert res.components["bleu"] == [1.0, 0.0, 0.0]
    assert {k[1]: v for k, v in res.statuses.items()} == {"ok": 1, "empty": 1, "zero": 1}
    with pytest.raises(ValueError, match="smoothing='bogus'"):
        BleuReward(RewardContext(tokenizer=tok), smoothing="bogus")
    with pytest.raises(ValueError, match="effective_order=false"):
        BleuReward(RewardContext(tokenizer=tok), max_n=2, weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="no tokenizer"):
        BleuReward(RewardContext())(RewardBatch(["p"], ["a"], [[1]], [Sample(question="q", answer="a")]))
