"""GRPO with only the code reward: the reward comes from running the completions in the sandbox.

Toy code task: the prompt is ``N=7``; the completion is a Python expression that the code reward
puts into the program template ``print({code})`` and runs in the sandbox with one stdin/stdout
test (expected stdout ``7``). A completion ``7`` passes (``ok``), ``3`` prints the wrong number
(``wrong_answer``), ``N`` raises NameError (``runtime_error``), ``+`` or ``(`` does not compile
(``compile_error``), whitespace or a special token is ``no_code``. The tiny model has a
character vocabulary of 26 tokens (digits, ``N=+-*/()``, space, newline, 6 special tokens), so a
random policy passes about 1 time in 26.

The fast test runs the whole ``postrl train`` path for a few steps and checks that the sandbox
really scored the completions; the slow one checks that the policy learns the task.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import read_metrics

from postrl.config import load_config
from postrl.data.prompts import render_prompt
from postrl.data.sources import Sample
from postrl.models.tiny import build_tiny_model
from postrl.rewards import sandbox as sbx
from postrl.rewards.code import CodeReward
from postrl.trainer import train

CHARS = "0123456789N=+-*/() \n"
TEMPLATE = "print({code})"
EXECUTED = ("ok", "wrong_answer", "runtime_error", "timeout")  # statuses only a sandbox run can give


@pytest.fixture(scope="module", autouse=True)
def _needs_isolation():
    ok, reason = sbx.probe_isolation()
    if not ok:
        pytest.skip(f"the code reward needs the sandbox, and this host cannot isolate code: {reason}")


@pytest.fixture(scope="module")
def code_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("code-tiny") / "model", seed=0, chars=CHARS)


def write_print_task(path: Path, n: int = 200, seed: int = 0) -> Path:
    """JSONL toy task: prompt ``N=d``, test case: the program prints ``d`` (stdin empty)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            d = rng.randrange(10)
            f.write(json.dumps({"prompt": f"N={d}", "answer": str(d),
                                "tests": [{"input": "", "output": f"{d}\n"}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def print_task(tmp_path_factory) -> Path:
    return write_print_task(tmp_path_factory.mktemp("code-data") / "print.jsonl")


def code_grpo_config(model_dir: Path, data: Path, out_dir: Path, *overrides: str):
    """GRPO on the print task with the code reward as the only reward (one token per completion)."""
    base = [
        f"model.name_or_path={model_dir}",
        "data.source=jsonl", f"data.path={data}", "data.eval_size=20",
        "rewards.0.name=code", "rewards.0.weight=1", f"rewards.0.kwargs.template={TEMPLATE}",
        "rewards.0.kwargs.timeout_s=2", "rewards.0.kwargs.workers=2",
        "algo.advantage=grpo", "rollout.n=8", "rollout.max_new_tokens=1",
        "train.prompts_per_step=16", "train.micro_batch_size=128", "train.lr=2e-3",
        "eval.before=false", "eval.after=false", "run.threads=1",
        f"run.output_dir={out_dir}", "run.name=code", "run.progress=false",
    ]
    return load_config(None, base + list(overrides))


def greedy_pass_rate(model_dir: Path, max_new_tokens: int = 1) -> float:
    """Fraction of the ten prompts ``N=0`` .. ``N=9`` whose greedy completion passes its test in the sandbox."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    samples = [Sample(question=f"N={d}", answer=str(d), metadata={"tests": [{"input": "", "output": f"{d}\n"}]})
               for d in range(10)]
    reward = CodeReward(template=TEMPLATE, timeout_s=2, workers=2)
    try:
        scores = []
        for s in samples:
            ids = torch.tensor([render_prompt(tok, [{"role": "user", "content": s.question}])])
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=tok.pad_token_id)
            text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            scored = reward.score_one(text, s)
            scores.append(scored.score if scored is not None else 0.0)
    finally:
        reward.close()
    return sum(scores) / len(scores)


def test_grpo_with_the_code_reward_runs_the_sandbox(code_model_dir, print_task, tmp_path, monkeypatch):
    """A few steps of the full pipeline: every score comes from compiling or running the completion."""
    calls = []
    run_many = sbx.Sandbox.run_many

    def counting_run_many(self, runs, **kwargs):
        calls.append(len(runs))
        return run_many(self, runs, **kwargs)

    monkeypatch.setattr(sbx.Sandbox, "run_many", counting_run_many)
    cfg = code_grpo_config(code_model_dir, print_task, tmp_path / "runs", "train.steps=3", "run.seed=0",
                           "rollout.n=4", "train.prompts_per_step=8", "train.micro_batch_size=32")
    run_dir, results = train(cfg)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3] and results["nonfinite_steps"] == 0
    assert calls and all(n == 1 for n in calls), "each executed completion is one sandbox call with one test"
    executed = 0
    for r in rows:
        status = {k.rsplit("/", 1)[1]: v for k, v in r.items() if k.startswith("reward_status/code/")}
        assert sum(status.values()) == 32, status  # every completion got a status
        assert r["reward_errors"] == 0 and r["reward_error_frac/code"] == 0.0
        # one test per sample: the reward is 1 exactly for the `ok` completions, and it is the only reward
        assert r["reward/code"] == pytest.approx(status.get("ok", 0) / 32)
        assert r["reward_mean"] == pytest.approx(r["reward/code"])
        executed += sum(status.get(s, 0) for s in EXECUTED)
    # a random policy writes programs of every kind: some do not compile, some run and print the wrong number
    totals = {s: sum(r.get(f"reward_status/code/{s}", 0) for r in rows) for s in
              ("ok", "wrong_answer", "runtime_error", "compile_error", "no_code")}
    assert totals["compile_error"] > 0 and totals["wrong_answer"] > 0 and totals["no_code"] > 0, totals
    assert sum(r["reward/code"] for r in rows) / 3 < 0.3, "a random policy passes rarely (about 1 in 26)"
    # identical programs for the same test are run once per batch: at most one sandbox call per executed sample
    assert 0 < len(calls) <= executed, (len(calls), executed)


@pytest.mark.slow
def test_grpo_with_the_code_reward_teaches_the_print_task(code_model_dir, print_task, tmp_path):
    """From chance (~1/26 of the programs print the right number) to >= 0.8 mean code reward, and
    the greedy policy passes (nearly) every prompt in the sandbox."""
    cfg = code_grpo_config(code_model_dir, print_task, tmp_path / "runs", "train.steps=80", "run.seed=0")
    before = greedy_pass_rate(code_model_dir)
    run_dir, results = train(cfg)
    rows = read_metrics(run_dir)
    first = sum(r["reward/code"] for r in rows[:5]) / 5
    last = sum(r["reward/code"] for r in rows[-10:]) / 10
    compile_first = sum(r.get("reward_status/code/compile_error", 0) for r in rows[:5]) / (5 * 128)
    compile_last = sum(r.get("reward_status/code/compile_error", 0) for r in rows[-10:]) / (10 * 128)
    after = greedy_pass_rate(sorted((run_dir / "checkpoints").iterdir())[-1])
    assert first < 0.15, f"expected a chance-level code reward at the start, got {first:.3f}"
    assert last >= 0.8, f"mean code reward over the last 10 steps {last:.3f} < 0.8"
    assert compile_last < compile_first / 2, (compile_first, compile_last)
    assert before <= 0.2 and after >= 0.9, (before, after)
