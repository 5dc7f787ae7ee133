import json
import threading
from collections import Counter

import pytest

from postrl.data import (
    ANSWER_MODES,
    DataError,
    JsonlSource,
    PromptSampler,
    PromptSource,
    ReasoningGymSource,
    Sample,
    build_messages,
    build_source,
    extract_answer,
    math_verify_score,
    render_prompt,
)

RG_KWARGS = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)


# ----------------------------------------------------------------------------- extraction


def test_extract_raw():
    assert extract_answer("  42 \n\n", "raw") == "42"


def test_extract_answer_tag():
    assert extract_answer("think <answer> 1 </answer> more <answer>\n7\n</answer>", "answer_tag") == "7"
    assert extract_answer("no tag here 5", "answer_tag") is None
    assert extract_answer("<answer>unclosed", "answer_tag") is None


def test_extract_boxed_nested():
    text = r"first \boxed{1} then \boxed{\frac{1}{2^{3}}} end"
    assert extract_answer(text, "boxed") == r"\frac{1}{2^{3}}"
    assert extract_answer("nothing", "boxed") is None
    assert extract_answer(r"\boxed{unbalanced {", "boxed") is None
    assert extract_answer(r"\boxed{a} \boxed{b", "boxed") == "a"


def test_extract_last_number():
    assert extract_answer("total is 1,234,567 dollars", "last_number") == "1234567"
    assert extract_answer("x = 3, then -2.5", "last_number") == "-2.5"
    assert extract_answer("ratio 3/4.", "last_number") == "3/4"
    assert extract_answer("the answer is 42.", "last_number") == "42"
    assert extract_answer("no digits", "last_number") is None


def test_extract_unknown_mode():
    with pytest.raises(ValueError) as ei:
        extract_answer("x", "bogus")
    for m in ANSWER_MODES:
        assert m in str(ei.value)


# ----------------------------------------------------------------------------- reasoning gym


@pytest.fixture(scope="module")
def rg_source():
    return ReasoningGymSource(
        "basic_arithmetic", RG_KWARGS, train_size=50, eval_size=20, seed=3, answer_extraction="raw"
    )


def test_rg_builds(rg_source):
    src = rg_source
    assert isinstance(src, PromptSource)
    assert src.name == "basic_arithmetic"
    assert len(src.train) == 50 and len(src.eval) == 20
    s = src.train[17]
    assert isinstance(s, Sample)
    assert s.uid == "basic_arithmetic/train/17"
    assert s.entry is not None and s.entry["answer"] == s.answer
    assert s.metadata["num_terms"] == 2 and s.metadata["task"] == "basic_arithmetic"
    assert src.eval[0].uid == "basic_arithmetic/eval/0"


def test_rg_eval_disjoint_and_deterministic(rg_source):
    train_q = {s.question for s in rg_source.train}
    eval_q = [s.question for s in rg_source.eval]
    assert not train_q & set(eval_q)
    assert len(set(eval_q)) == len(eval_q)
    again = ReasoningGymSource("basic_arithmetic", RG_KWARGS, train_size=50, eval_size=20, seed=3, answer_extraction="raw")
    assert [s.question for s in again.train] == [s.question for s in rg_source.train]
    assert [s.question for s in again.eval] == eval_q
    other = ReasoningGymSource("basic_arithmetic", RG_KWARGS, train_size=50, eval_size=0, seed=4, answer_extraction="raw")
    assert [s.question for s in other.train] != [s.question for s in rg_source.train]
    assert other.eval == []


def test_rg_scoring(rg_source):
    s = rg_source.train[0]
    assert rg_source.score(f"  {s.answer} ", s) == 1.0
    assert rg_source.is_correct(s.answer, s)
    wrong = str(int(float(s.answer)) + 1)
    assert rg_source.score(wrong, s) == 0.0
    assert not rg_source.is_correct(wrong, s)
    # reasoning-gym default partial credit: oracle contained in a longer answer
    partial = rg_source.score(f"{s.answer} xyz", s)
    assert 0.0 < partial < 1.0
    assert not rg_source.is_correct(f"{s.answer} xyz", s)


def test_rg_answer_tag_scoring():
    src = ReasoningGymSource("basic_arithmetic", RG_KWARGS, train_size=3, eval_size=0, seed=0, answer_extraction="answer_tag")
    s = src.train[0]
    assert src.score(f"reasoning... <answer>{s.answer}</answer>", s) == 1.0
    assert src.score(f"reasoning... {s.answer}", s) == 0.0  # no tag -> 0


def test_rg_unknown_task():
    with pytest.raises(DataError) as ei:
        ReasoningGymSource("basic_arithmetc", {}, train_size=2, eval_size=0, seed=0, answer_extraction="raw")
    msg = str(ei.value)
    assert "Did you mean: basic_arithmetic" in msg
    assert "chain_sum" in msg and "leg_counting" in msg  # full list of valid names
    assert isinstance(ei.value, ValueError)


def test_rg_bad_kwarg():
    with pytest.raises(DataError) as ei:
        ReasoningGymSource("basic_arithmetic", {"min_term": 2}, train_size=2, eval_size=0, seed=0, answer_extraction="raw")
    msg = str(ei.value)
    assert "basic_arithmetic" in msg and "min_term" in msg and "min_terms" in msg and "max_digits" in msg


def test_rg_invalid_kwarg_value():
    with pytest.raises(DataError) as ei:
        ReasoningGymSource(
            "basic_arithmetic", {"min_terms": 3, "max_terms": 2}, train_size=2, eval_size=0, seed=0, answer_extraction="raw"
        )
    msg = str(ei.value)
    assert "basic_arithmetic" in msg and "max_terms must be >= min_terms" in msg


def test_rg_reserved_kwarg():
    with pytest.raises(DataError, match="seed"):
        ReasoningGymSource("basic_arithmetic", {"seed": 1}, train_size=2, eval_size=0, seed=0, answer_extraction="raw")


def test_rg_small_space_shortfall():
    # 1-term, 1-digit, no negation: only ~11 distinct questions exist -> eval is short, never overlaps.
    kw = dict(min_terms=1, max_terms=1, min_digits=1, max_digits=1, allow_negation=False, allow_parentheses=False)
    src = ReasoningGymSource("basic_arithmetic", kw, train_size=4, eval_size=20, seed=0, answer_extraction="raw")
    assert not {s.question for s in src.train} & {s.question for s in src.eval}
    assert 0 < len(src.eval) < 20
    assert src.eval_shortfall == 20 - len(src.eval)
    assert len({s.question for s in src.eval}) == len(src.eval)


# ----------------------------------------------------------------------------- jsonl


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_jsonl_good(tmp_path):
    recs = [json.dumps({"prompt": f"q{i}", "answer": i, "level": i % 3}) for i in range(10)]
    p = _write(tmp_path / "data.jsonl", recs[:5] + [""] + recs[5:])
    src = JsonlSource(p, None, train_size=0, eval_size=3, seed=0, answer_extraction="boxed")
    assert len(src.train) == 7 and len(src.eval) == 3
    assert not {s.uid for s in src.train} & {s.uid for s in src.eval}
    s = next(s for s in src.train + src.eval if s.question == "q7")
    assert s.answer == "7" and isinstance(s.answer, str)
    assert s.uid == "data.jsonl:9"  # blank line 6 is skipped but counts for line numbers
    assert s.metadata["level"] == 1 and s.entry is None
    # eval capped at half
    src2 = JsonlSource(p, None, train_size=4, eval_size=100, seed=0, answer_extraction="boxed")
    assert len(src2.eval) == 5 and len(src2.train) == 4
    # separate eval file
    e = _write(tmp_path / "ev.jsonl", [json.dumps({"prompt": "e", "answer": "1"})])
    src3 = build_source("jsonl", path=p, eval_path=e, train_size=0, eval_size=10, seed=0, answer_extraction="raw")
    assert len(src3.train) == 10 and [s.uid for s in src3.eval] == ["ev.jsonl:1"]


def test_jsonl_malformed_line(tmp_path):
    p = _write(tmp_path / "bad.jsonl", ['{"prompt": "a", "answer": 1}', '{"prompt": "b", "answer": ', ""])
    with pytest.raises(DataError) as ei:
        JsonlSource(p, None, 0, 1, 0, "raw")
    assert "bad.jsonl:2" in str(ei.value) and "malformed JSON" in str(ei.value)


def test_jsonl_missing_field_and_types(tmp_path):
    p = _write(tmp_path / "m.jsonl", ['{"prompt": "a", "answer": 1}', '{"prompt": "b"}'])
    with pytest.raises(DataError, match=r"m\.jsonl:2.*'answer'"):
        JsonlSource(p, None, 0, 1, 0, "raw")
    p = _write(tmp_path / "t.jsonl", ['{"prompt": ["a"], "answer": 1}'])
    with pytest.raises(DataError, match=r"t\.jsonl:1.*'prompt' must be a string"):
        JsonlSource(p, None, 0, 1, 0, "raw")


def test_jsonl_missing_and_empty_file(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="nope.jsonl"):
        JsonlSource(missing, None, 0, 1, 0, "raw")
    empty = _write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="no records"):
        JsonlSource(empty, None, 0, 1, 0, "raw")


def test_math_verify_scoring(tmp_path):
    p = _write(
        tmp_path / "mv.jsonl",
        [json.dumps({"prompt": "a", "answer": 42}), json.dumps({"prompt": "b", "answer": "\\frac{1}{2}"})],
    )
    src = JsonlSource(p, None, train_size=0, eval_size=0, seed=0, answer_extraction="boxed")
    s42 = next(s for s in src.train if s.question == "a")
    shalf = next(s for s in src.train if s.question == "b")
    assert src.score(r"so \boxed{42}", s42) == 1.0
    assert src.score(r"so \boxed{42.0}", s42) == 1.0
    assert src.score(r"so \boxed{43}", s42) == 0.0
    assert src.score("no box 42", s42) == 0.0
    assert src.score(r"\boxed{0.5}", shalf) == 1.0
    assert src.score(r"\boxed{\frac{1}{2}}", shalf) == 1.0
    assert src.is_correct(r"\boxed{1/2}", shalf)
    assert src.score(r"\boxed{\frac{1}{3}}", shalf) == 0.0
    assert src.score(r"\boxed{}", shalf) == 0.0
    assert src.score(r"\boxed{\frac{{}", shalf) == 0.0  # garbage never raises
    assert math_verify_score("42", "42.0") == 1.0 and math_verify_score("0.5", "\\frac{1}{2}") == 1.0


def test_math_verify_in_thread():
    res = {}
    t = threading.Thread(target=lambda: res.update(v=math_verify_score("\\frac{1}{2}", "0.5")))
    t.start()
    t.join()
    assert res["v"] == 1.0


def test_build_source_errors():
    with pytest.raises(DataError) as ei:
        build_source("jsnol", path="x")
    assert "jsonl" in str(ei.value) and "reasoning_gym" in str(ei.value)
    with pytest.raises(DataError, match="task"):
        build_source("jsonl", path="x", task="basic_arithmetic")
    src = build_source("reasoning_gym", task="basic_arithmetic", task_kwargs=RG_KWARGS, train_size=2, eval_size=1, seed=0, answer_extraction="raw")
    assert isinstance(src, ReasoningGymSource) and len(src.train) == 2


# ----------------------------------------------------------------------------- toy tasks


@pytest.mark.parametrize("task,question,answer", [("copy", "copy 4821", "4821"), ("reverse", "reverse 4821", "1284"),
                                                   ("sort", "sort 4821", "1248")])
def test_toy_tasks_answers(task, question, answer):
    src = build_source("toy", task=task, task_kwargs={"length": 4}, train_size=300, eval_size=50, seed=3)
    assert len(src.train) == 300 and len(src.eval) == 50
    for s in src.train + src.eval:
        digits = s.question.split(" ")[1]
        assert s.question == f"{task} {digits}" and len(digits) == 4
        expected = {"copy": digits, "reverse": digits[::-1], "sort": "".join(sorted(digits))}[task]
        assert s.answer == expected
    fake = Sample(question=question, answer=answer)
    assert src.score(answer, fake) == 1.0 and src.is_correct(f" {answer}\n", fake)


def test_toy_split_is_disjoint_deterministic_and_scored_by_position():
    src = build_source("toy", task="sort", task_kwargs={"length": 4}, train_size=1000, eval_size=200, seed=0)
    train_q, eval_q = {s.question for s in src.train}, {s.question for s in src.eval}
    assert len(train_q) == 1000 and len(eval_q) == 200 and not train_q & eval_q
    assert not {s.answer for s in src.train} & {s.answer for s in src.eval}  # no held-out permutation is trained on
    again = build_source("toy", task="sort", task_kwargs={"length": 4}, train_size=1000, eval_size=200, seed=0)
    assert [s.question for s in again.train] == [s.question for s in src.train]
    assert [s.question for s in build_source("toy", task="sort", task_kwargs={"length": 4}, train_size=5,
                                             eval_size=5, seed=1).eval] != [s.question for s in src.eval[:5]]
    s = Sample(question="sort 8421", answer="1248")
    assert src.score("1248", s) == 1.0
    assert src.score("1249", s) == 0.75 and not src.is_correct("1249", s)
    assert src.score("124", s) == 0.75 and src.score("12488", s) == 0.8 and src.score("", s) == 0.0
    binary = build_source("toy", task="sort", task_kwargs={"length": 4, "partial_credit": False}, train_size=1,
                          eval_size=1, seed=0)
    assert binary.score("1249", s) == 0.0 and binary.score("1248", s) == 1.0


def test_toy_near_miss_is_the_answer_to_a_prompt_one_symbol_off():
    src = build_source("toy", task="sort", task_kwargs={"length": 4}, train_size=200, eval_size=50, seed=0)
    for s in src.train + src.eval:
        rejected = s.metadata["rejected"]
        assert rejected != s.answer and rejected == "".join(sorted(rejected))  # a sorted string, but wrong
        assert sum((Counter(s.answer) - Counter(rejected)).values()) == 1  # exactly one symbol differs
    rev = build_source("toy", task="reverse", task_kwargs={"length": 5}, train_size=50, eval_size=10, seed=0)
    for s in rev.train:
        assert sum(a != b for a, b in zip(s.answer, s.metadata["rejected"])) == 1


def test_toy_synthetic_pairs_use_the_near_miss():
    from postrl.data.pairs import synthetic_pairs

    src = build_source("toy", task="reverse", task_kwargs={"length": 3}, train_size=20, eval_size=5, seed=0)
    pairs = synthetic_pairs(src.train)
    assert len(pairs) == 20
    for p, s in zip(pairs, src.train):
        assert p.prompt == [{"role": "user", "content": s.question}]
        assert p.chosen[0]["content"] == s.answer and p.rejected[0]["content"] == s.metadata["rejected"]


def test_toy_errors():
    with pytest.raises(DataError, match="unknown toy task 'revrese'. Did you mean 'reverse'.*copy, reverse, sort"):
        build_source("toy", task="revrese")
    with pytest.raises(DataError, match="unknown task_kwargs 'digits'; valid: length, alphabet, partial_credit"):
        build_source("toy", task="copy", task_kwargs={"digits": 3})
    with pytest.raises(DataError, match="length must be an int >= 1"):
        build_source("toy", task="copy", task_kwargs={"length": 0})
    with pytest.raises(DataError, match="alphabet must be a string of at least 2 distinct"):
        build_source("toy", task="copy", task_kwargs={"alphabet": "aa"})
    with pytest.raises(DataError, match="only 100 distinct strings of length 2"):
        build_source("toy", task="copy", task_kwargs={"length": 2}, train_size=90, eval_size=20)
    with pytest.raises(DataError, match="whose answers differ from the held-out answers"):
        build_source("toy", task="sort", task_kwargs={"length": 2}, train_size=90, eval_size=10)


def test_bad_answer_extraction():
    with pytest.raises(DataError, match="last_number"):
        ReasoningGymSource("basic_arithmetic", {}, 1, 0, 0, "nope")


# ----------------------------------------------------------------------------- prompts


def _tiny_tokenizer(chat_template=None):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "</s>", "<|user|>", "<|system|>", "<|assistant|>"])
    tok.train_from_iterator(["be brief what is 2 + 3 ?", "solve it"], trainer=trainer)
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    if chat_template is not None:
        t.chat_template = chat_template
    return t


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_build_messages():
    s = Sample(question="what is 2 + 3 ?", answer="5", metadata={}, entry=None, uid="x")
    assert build_messages(s, None, "{question}") == [{"role": "user", "content": "what is 2 + 3 ?"}]
    msgs = build_messages(s, "be brief", "solve it {question}")
    assert msgs == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "solve it what is 2 + 3 ?"},
    ]
    with pytest.raises(ValueError, match="question"):
        build_messages(s, None, "no placeholder")


def test_render_prompt_chat_template():
    tok = _tiny_tokenizer(CHAT_TEMPLATE)
    s = Sample(question="what is 2 + 3 ?", answer="5", metadata={}, entry=None, uid="x")
    msgs = build_messages(s, "be brief", "{question}")
    ids = render_prompt(tok, msgs)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    expected = tok("<|system|> be brief <|user|> what is 2 + 3 ? <|assistant|>", add_special_tokens=False)["input_ids"]
    assert ids == expected
    assert ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    # forcing the plain fallback
    plain = render_prompt(tok, msgs, use_chat_template=False)
    assert plain == tok("be brief\n\nwhat is 2 + 3 ?\n", add_special_tokens=True)["input_ids"]


def test_render_prompt_no_template():
    tok = _tiny_tokenizer(None)
    s = Sample(question="what is 2 + 3 ?", answer="5", metadata={}, entry=None, uid="x")
    msgs = build_messages(s, "be brief", "{question}")
    ids = render_prompt(tok, msgs)
    assert ids == tok("be brief\n\nwhat is 2 + 3 ?\n", add_special_tokens=True)["input_ids"]
    assert len(ids) == 8
    no_sys = render_prompt(tok, build_messages(s, None, "{question}"))
    assert no_sys == tok("what is 2 + 3 ?\n", add_special_tokens=True)["input_ids"]


# ----------------------------------------------------------------------------- sampler


def test_sampler_epochs_and_determinism():
    items = list(range(10))
    a = PromptSampler(items, seed=5)
    first_epoch = a.next_batch(4) + a.next_batch(4) + a.next_batch(2)
    assert sorted(first_epoch) == items  # a full epoch is a permutation
    second = a.next_batch(10)
    assert sorted(second) == items and second != first_epoch  # reshuffled with seed+epoch
    b = PromptSampler(items, seed=5)
    assert b.next_batch(20) == first_epoch + second
    c = PromptSampler(items, seed=6)
    assert c.next_batch(10) != first_epoch
    with pytest.raises(ValueError):
        a.next_batch(0)
    with pytest.raises(ValueError):
        PromptSampler([], seed=0)


def test_sampler_resume():
    items = [f"s{i}" for i in range(7)]
    a = PromptSampler(items, seed=1)
    a.next_batch(3)
    a.next_batch(5)  # straddles an epoch boundary
    state = json.loads(json.dumps(a.state_dict()))  # must be JSON-serialisable
    future = [a.next_batch(4) for _ in range(5)]
    b = PromptSampler(items, seed=1)
    b.load_state_dict(state)
    assert [b.next_batch(4) for _ in range(5)] == future
    with pytest.raises(ValueError):
        PromptSampler(items[:3], seed=1).load_state_dict(state)
