"""The code reward: extraction, output comparison, test collection, scoring and statuses, on
positive, negative and malformed completions (empty, no code, garbage unicode, very long text)."""

from __future__ import annotations

import pytest

from postrl.config import load_config
from postrl.data.sources import Sample
from postrl.rewards import RewardBatch, RewardPipeline, resolve_reward
from postrl.rewards import sandbox as sbx
from postrl.rewards.code import (CODE_STATUSES, CodeReward, apply_template, check_syntax, collect_tests,
                                 extract_code, outputs_match, overall_status, score_tests)

ADD_IO = {"tests": [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -1", "output": "9"},
                    {"input": "0 0", "output": "0"}, {"input": "7 8", "output": "15"}]}
ADD_ASSERTS = {"test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0",
                             "assert add(2, 2) == 4"]}
SOLUTION_IO = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
SOLUTION_FN = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."


@pytest.fixture(scope="module")
def reward():
    ok, reason = sbx.probe_isolation()
    if not ok:
        pytest.skip(f"this host cannot isolate code: {reason}")
    r = CodeReward(timeout_s=1.0, memory_mb=256, workers=2)
    yield r
    r.close()


def score(reward, completion, metadata):
    return reward.score_one(completion, Sample(question="q", answer="", metadata=metadata))


# ----------------------------------------------------------------------------------------------
# pure helpers
# ----------------------------------------------------------------------------------------------
def test_extract_code_modes():
    text = "intro\n```python\nx = 1\n```\nthen\n```\nprint(2)\n```\nand\n```py\nprint(3)\n```\n"
    assert extract_code(text) == "print(3)"  # the last python block wins over untagged ones
    assert extract_code(text, "any_block") == "print(3)"
    assert extract_code("```\nprint(2)\n```\n```bash\nls\n```") == "print(2)"  # untagged when no python
    assert extract_code("```\nprint(2)\n```\n```bash\nls\n```", "any_block") == "ls"
    assert extract_code("```bash\nls\n```") is None  # auto: a non-python block only -> nothing to run
    assert extract_code("print(1)") == "print(1)"  # no fence at all: the whole text
    assert extract_code("print(1)", "python_block") is None
    assert extract_code("```python\nprint(1)\n```", "raw") == "```python\nprint(1)\n```"
    assert extract_code("text\n```python\nfor i in range(3):\n    print(i)") == "for i in range(3):\n    print(i)"
    assert extract_code("  ```Python3\n  print(1)\n  ```") == "  print(1)"  # indentation inside kept
    for empty in ("", "   \n", "```python\n\n```", None, 17):
        assert extract_code(empty) is None
    with pytest.raises(ValueError, match="extract='last'.*valid: auto"):
        extract_code("x", "last")


def test_outputs_match_normalizes_whitespace():
    assert outputs_match("5\n", "5")
    assert outputs_match("1  2 \r\n3\n\n\n", "\n1 2\n3")
    assert not outputs_match("1\n2", "1 2")  # line structure matters for 'lines'
    assert outputs_match("1\n2", "1 2", "tokens")
    assert not outputs_match("5\n", "5", "exact")
    assert not outputs_match("", "0")
    with pytest.raises(ValueError, match="compare='fuzzy'"):
        outputs_match("a", "a", "fuzzy")


def test_check_syntax():
    assert check_syntax("def f(x):\n    return x\n") is None
    assert check_syntax("def f(:\n").startswith("SyntaxError")
    assert check_syntax("x = '\\0'") is None and check_syntax("x = 1\0") is not None  # a raw null byte
    assert check_syntax("(" * 300 + ")" * 300) is not None  # too deeply nested, reported not raised


def test_collect_tests_formats():
    io, asserts, setup = collect_tests({"tests": [{"input": "1", "output": "2"}, "assert f() == 1"]})
    assert io == [("1", "2")] and asserts == ["assert f() == 1"] and setup == ""
    io, _, _ = collect_tests({"input_output": '{"inputs": ["a\\n", ["b", "c"]], "outputs": ["x", "y"]}'})
    assert io == [("a\n", "x"), ("b\nc\n", "y")]
    _, asserts, setup = collect_tests({"test_list": ["assert g()"], "test_setup_code": "import math"})
    assert asserts == ["assert g()"] and setup == "import math"
    assert collect_tests(None) == ([], [], "")
    with pytest.raises(ValueError, match=r"metadata\['tests'\]\[0\]"):
        collect_tests({"tests": [{"in": "1"}]})
    with pytest.raises(ValueError, match="equal length"):
        collect_tests({"input_output": {"inputs": ["1"], "outputs": []}})
    with pytest.raises(ValueError, match="test_list"):
        collect_tests({"test_list": "assert x"})


def test_score_tests_by_hand():
    outcomes = ["pass", "wrong_answer", "pass", "timeout"]
    assert score_tests(outcomes) == 0.5  # 2 of 4
    assert score_tests(outcomes, "all") == 0.0
    assert score_tests(["pass"] * 3, "all") == 1.0
    assert score_tests(["pass", "skipped", "skipped"]) == pytest.approx(1 / 3)
    assert score_tests([]) == 0.0
    assert overall_status(outcomes) == "timeout"
    assert overall_status(["pass", "wrong_answer", "runtime_error"]) == "runtime_error"
    assert overall_status(["pass", "pass"]) == "ok"
    with pytest.raises(ValueError, match="mode='best'"):
        score_tests(outcomes, "best")


def test_bad_kwargs_are_named():
    with pytest.raises(ValueError, match="mode='half'.*extract='x'"):
        CodeReward(mode="half", extract="x")
    with pytest.raises(ValueError, match="workers=0"):
        CodeReward(workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        CodeReward(timeout_s=0)
    for bad in ("print(code)", "print({})", 3):
        with pytest.raises(ValueError, match=r"template=.*must be a string containing \{code\}"):
            CodeReward(template=bad)


def test_apply_template_is_plain_substitution():
    assert apply_template("1 + 2", None) == "1 + 2"
    assert apply_template("1 + 2", "print({code})") == "print(1 + 2)"
    # other braces stay as written (no str.format), every {code} is replaced
    assert apply_template("x", "d = {'k': {code}}\nprint(d['k'], {code})") == "d = {'k': x}\nprint(d['k'], x)"
    assert apply_template("{name}", "print({code})") == "print({name})"  # the code itself is not expanded


# ----------------------------------------------------------------------------------------------
# scoring in the sandbox
# ----------------------------------------------------------------------------------------------
def test_correct_stdin_stdout_solution(reward):
    s = score(reward, SOLUTION_IO, ADD_IO)
    assert s.score == 1.0 and s.info == {"status": "ok", "passed": 4, "total": 4}


def test_correct_assert_solution(reward):
    s = score(reward, SOLUTION_FN, ADD_ASSERTS)
    assert s.score == 1.0 and s.info["status"] == "ok"


def test_partially_wrong_solution_gets_the_fraction(reward):
    wrong = "```python\ndef add(a, b):\n    return abs(a) + b\n```"  # fails only add(-1, 1)
    s = score(reward, wrong, ADD_ASSERTS)
    assert s.score == 0.75 and s.info["status"] == "wrong_answer" and s.info["passed"] == 3
    assert "AssertionError" in s.info["error"]
    io_wrong = "```python\na, b = map(int, input().split())\nprint(a + b if a else 1)\n```"  # fails 0 0
    assert score(reward, io_wrong, ADD_IO).score == 0.75


def test_mode_all_is_all_or_nothing(reward):
    strict = CodeReward(mode="all", timeout_s=1.0, workers=1)
    wrong = "```python\ndef add(a, b):\n    return abs(a) + b\n```"
    assert strict.score_one(SOLUTION_FN, Sample("q", "", metadata=ADD_ASSERTS)).score == 1.0
    s = strict.score_one(wrong, Sample("q", "", metadata=ADD_ASSERTS))
    assert s.score == 0.0 and s.info["status"] == "wrong_answer"


def test_statuses_are_distinct(reward):
    cases = {
        "compile_error": "```python\ndef add(a, b)\n    return a + b\n```",
        "runtime_error": "```python\ndef add(a, b):\n    return a + undefined_name\n```",
        "timeout": "```python\ndef add(a, b):\n    while True:\n        pass\n```",
        "no_code": "I would run this:\n```bash\nls\n```\n",
        "wrong_answer": "```python\ndef add(a, b):\n    return a - b\n```",
    }
    for status, completion in cases.items():
        s = score(reward, completion, ADD_ASSERTS)
        assert s.info["status"] == status and s.score < 1.0, (status, s)
        assert status in CODE_STATUSES
    # timeout: the remaining tests are skipped, the score is what passed (none)
    slow = score(reward, cases["timeout"], ADD_ASSERTS)
    assert slow.score == 0.0 and slow.info["total"] == 4
    assert score(reward, SOLUTION_FN, {}).info["status"] == "no_tests"


def test_template_wraps_the_completion_before_compiling_and_running(reward):  # reward: skips without isolation
    expr = CodeReward(template="print({code})", timeout_s=1.0, workers=1)
    seven = Sample("N=7", "7", metadata={"tests": [{"input": "", "output": "7\n"}]})
    try:
        results = {c: expr.score_one(c, seven) for c in ("7", "3+4", "(7)", "3", "N", "+", "7)", " ", "")}
    finally:
        expr.close()
    assert {c: s.info["status"] for c, s in results.items()} == {
        "7": "ok", "3+4": "ok", "(7)": "ok",  # judged by what the program prints, not by the text
        "3": "wrong_answer", "N": "runtime_error",  # NameError inside the sandbox
        "+": "compile_error", "7)": "compile_error",  # print(+) and print(7)) do not compile
        " ": "no_code", "": "no_code"}  # nothing to put into the template
    assert [s.score for s in results.values()] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert "NameError" in results["N"].info["error"]
    assert "line 1" in results["+"].info["error"]


def test_a_crash_in_a_stdin_program_is_a_runtime_error(reward):
    s = score(reward, "```python\nprint(int(input()) // 0)\n```", {"tests": [{"input": "3", "output": "1"}]})
    assert s.score == 0.0 and s.info["status"] == "runtime_error" and "ZeroDivisionError" in s.info["error"]


@pytest.mark.parametrize("completion", ["", "   ", "\u202e\u0000\udcff\U0001F600 ```python\n\x00\x1b[2J\n```",
                                        "零一二三" * 50, "x" * 200_000, "```python\n" + "a = 1\n" * 50_000 + "```"])
def test_malformed_completions_score_zero_without_crashing(reward, completion):
    s = score(reward, completion, ADD_IO)
    assert s.score == 0.0 and s.info["status"] in ("no_code", "compile_error", "runtime_error", "wrong_answer")


def test_code_over_max_code_chars_is_refused_before_it_runs(reward):
    s = score(reward, "x" * 200_000, ADD_IO)  # would be a NameError (runtime_error) if it ran
    assert s.info["status"] == "compile_error" and "max_code_chars" in s.info["error"]


def test_garbage_unicode_in_output_and_input(reward):
    meta = {"tests": [{"input": "héllo \U0001F600\n", "output": "\U0001F600 olléh"}]}
    s = score(reward, "```python\nprint(input()[::-1].strip())\n```", meta)
    assert s.score == 1.0
    s = score(reward, "```python\nimport sys\nsys.stdout.buffer.write(b'\\xff\\xfe')\n```", meta)
    assert s.score == 0.0 and s.info["status"] == "wrong_answer"


def test_malformed_sample_tests_fail_only_that_completion(reward):
    batch = RewardBatch(prompts=["", ""], completions=[SOLUTION_FN, SOLUTION_FN], completion_ids=[[], []],
                        samples=[Sample("q", "", metadata={"tests": [42]}), Sample("q", "", metadata=ADD_ASSERTS)])
    out = reward(batch)
    assert out[0] is None and out[1].score == 1.0


def test_batch_dedupes_identical_programs(reward, monkeypatch):
    calls = []
    real = reward.sandbox.run_many

    def counting(runs, **kw):
        calls.append(len(runs))
        return real(runs, **kw)

    monkeypatch.setattr(reward.sandbox, "run_many", counting)
    completions = [SOLUTION_FN, SOLUTION_FN + "\n", "```python\ndef add(a, b):\n    return a * b\n```", SOLUTION_FN]
    samples = [Sample("q", "", metadata=ADD_ASSERTS)] * 4
    out = reward(RewardBatch([""] * 4, completions, [[]] * 4, samples))
    assert [s.score for s in out] == [1.0, 1.0, 0.5, 1.0]  # a * b passes add(0, 0) and add(2, 2)
    assert len(calls) == 2  # three completions hold the same program


def test_through_the_pipeline_from_a_yaml_config(tmp_path, reward):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("rewards:\n  - {name: code, weight: 2.0, kwargs: {mode: fraction, timeout_s: 1}}\n")
    cfg = load_config(cfg_file)
    assert cfg.rewards[0].name == "code" and cfg.rewards[0].kwargs == {"mode": "fraction", "timeout_s": 1}
    assert resolve_reward("code").batched
    pipe = RewardPipeline(cfg.rewards)  # the specs exactly as the config loaded them
    sample = Sample("q", "", metadata=ADD_ASSERTS)
    res = pipe([SOLUTION_FN, "no code here\n```bash\nls\n```", "```python\ndef add(a, b):\n    return a - b\n```"],
               [sample] * 3)
    pipe.close()
    assert res.components["code"] == [1.0, 0.0, 0.25]  # a - b passes only add(0, 0) == 0
    assert res.total == [2.0, 0.0, 0.5]
    assert res.statuses[("code", "ok")] == 1 and res.statuses[("code", "no_code")] == 1
