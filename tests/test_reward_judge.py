"""The generative judge: parsing, the OpenAI-compatible HTTP backend (a local stub server), a local model."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from postrl.config import RewardSpec
from postrl.data.sources import Sample
from postrl.rewards import RewardContext, RewardPipeline
from postrl.rewards.judge import JudgeReward, parse_judgement


@pytest.mark.parametrize("text, expected", [
    ("The answer is fine.\nScore: 7", 0.7),
    ("score=10", 1.0),
    ("Score: 3/10 ... on reflection, Score: 8/10", 0.8),  # the last score counts
    ("SCORE: 0", 0.0),
    ("Score: 4.5", 0.45),
    ("Score: 11", None),  # out of range
    ("Score: -1", None),
    ("I cannot decide.", None),
    ("", None),
    ("💥" * 100, None),
])
def test_parse_score(text, expected):
    got = parse_judgement(text, "score", max_score=10)
    assert (got is None and expected is None) or got == pytest.approx(expected)


@pytest.mark.parametrize("text, expected", [
    ("Verdict: CORRECT", 1.0),
    ("This is incorrect.", 0.0),  # never read as "correct"
    ("At first yes, but no.", 0.0),  # the last verdict counts
    ("maybe", None),
    ("correctness matters", None),  # whole words only
])
def test_parse_verdict(text, expected):
    assert parse_judgement(text, "verdict") == expected


def test_parse_custom_verdicts_and_bad_modes():
    assert parse_judgement("[[A]]", "verdict", verdicts={"A": 1.0, "B": 0.0}) == 1.0
    with pytest.raises(ValueError, match="'score' or 'verdict'"):
        parse_judgement("x", "stars")
    with pytest.raises(ValueError, match="max_score"):
        parse_judgement("Score: 1", "score", max_score=0)


class _Stub(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint whose reply depends on the graded completion."""

    seen: list = []

    def do_POST(self):  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Stub.seen.append((self.path, body, self.headers.get("Authorization")))
        prompt = body["messages"][-1]["content"]
        if "SERVER-ERROR" in prompt:
            self.send_response(500)
            self.end_headers()
            return
        if "GOOD" in prompt:
            reply = "Looks right. Score: 9"
        elif "BAD" in prompt:
            reply = "Wrong. Score: 1"
        else:
            reply = "I refuse to grade this."
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Stub.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_http_judge_scores_and_counts_failures(stub_server, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    pipe = RewardPipeline([RewardSpec("judge", kwargs={"endpoint": stub_server, "model": "judge-1",
                                                       "api_key_env": "MY_JUDGE_KEY", "retries": 1})])
    samples = [Sample(question="2+2?", answer="4", uid=f"u{i}") for i in range(4)]
    res = pipe(["GOOD 4", "BAD 5", "unsure", "SERVER-ERROR"], samples)
    comp = res.components["judge"]
    assert comp[:2] == [pytest.approx(0.9), pytest.approx(0.1)]
    assert res.failed["judge"] == [False, False, True, True]
    assert comp[2] == 0.0 and comp[3] == 0.0
    assert res.statuses[("judge", "unparsable")] == 1 and res.statuses[("judge", "request_failed")] == 1
    path, body, auth = _Stub.seen[0]
    assert path == "/v1/chat/completions" and body["model"] == "judge-1" and auth == "Bearer sk-test"
    assert "2+2?" in body["messages"][-1]["content"] and "Reference answer:\n4" in body["messages"][-1]["content"]
    assert sum(1 for s in _Stub.seen if "SERVER-ERROR" in s[1]["messages"][-1]["content"]) == 2  # one retry


def test_unreachable_endpoint_is_a_failure_not_a_crash():
    judge = JudgeReward(RewardContext(), endpoint="http://127.0.0.1:9/v1", model="m", retries=0, timeout_s=2)
    from postrl.rewards.base import RewardBatch

    out = judge(RewardBatch(["p"], ["c"], [[1]], [Sample("q", "a")]))
    assert out[0].info["status"] == "request_failed"


def test_judge_config_errors():
    with pytest.raises(ValueError, match="exactly one of 'endpoint'"):
        JudgeReward(RewardContext())
    with pytest.raises(ValueError, match="needs 'model'"):
        JudgeReward(RewardContext(), endpoint="http://x/v1")
    with pytest.raises(ValueError, match="'score' or 'verdict'"):
        JudgeReward(RewardContext(), endpoint="http://x/v1", model="m", parse="stars")


def test_local_judge_runs_postrls_generator(tiny_model_dir):
    pipe = RewardPipeline([RewardSpec("judge", kwargs={"model_path": str(tiny_model_dir), "parse": "verdict",
                                                       "verdicts": {"a": 1.0, "b": 0.0}, "max_new_tokens": 4,
                                                       "template": "{completion}"})],
                          context=RewardContext(device="cpu"))
    res = pipe(["ab", "ba", "c"], [Sample("q", "a")] * 3)
    # an untrained tiny model says anything: each reply is either a parsed verdict or a counted failure
    for value, failed in zip(res.components["judge"], res.failed["judge"]):
        assert (failed and value == 0.0) or (not failed and value in (0.0, 1.0))
    assert sum(res.statuses.values()) == 3
