"""`postrl eval` end to end on tiny models, task specs (reasoning-gym, JSONL, CHAMP), and the trainer's
held-out evaluation going through the same runner."""

import importlib.util
import json
from collections import defaultdict

import pytest

from postrl.cli import main
from postrl.eval.metrics import pass_at_k
from postrl.eval.runner import EvalError, generate_and_score, heldout_eval, model_labels, resolve_out_dir
from postrl.eval.tasks import TaskSpecError, build_task, champ_gold_candidates, champ_score, parse_task_spec
from postrl.models.tiny import build_tiny_model
from tests.conftest import read_metrics


@pytest.fixture(scope="module")
def second_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny2") / "model", seed=1)


def test_postrl_eval_two_models_end_to_end(tiny_model_dir, second_model, copy_task, tmp_path, capsys):
    out = tmp_path / "ev"
    argv = ["eval", "--model", str(tiny_model_dir), "--model", str(second_model), "--task", f"{copy_task}:size=24",
            "--n", "8", "--k", "1,2,4,8", "--max-new-tokens", "1", "--answer-extraction", "raw",
            "--bootstrap", "200", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "pass@8 %" in printed and "greedy accuracy %" in printed  # the side-by-side table

    result = json.loads((out / "eval.json").read_text())
    # both directories are called "model": the labels fall back to the full paths
    assert [m["name"] for m in result["models"]] == [str(tiny_model_dir.resolve()), str(second_model.resolve())]
    assert result["n"] == 8 and result["num_problems"] == 24
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 24 * (1 + 8)  # per model and problem: one greedy + n sampled completions
    png = (out / "pass_at_k.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 2000

    for m in result["models"]:
        # pass@k recomputed from samples.jsonl (the estimator over each problem's n scored samples)
        correct = defaultdict(list)
        for s in samples:
            if s["model"] == m["name"] and s["kind"] == "sampled":
                correct[s["uid"]].append(s["correct"])
        assert len(correct) == 24 and all(len(v) == 8 for v in correct.values())
        for k in (1, 2, 4, 8):
            stat = m["pass_at_k"][str(k)]
            expected = sum(pass_at_k(8, sum(v), k) for v in correct.values()) / 24
            assert stat["value"] == pytest.approx(expected)
            lo, hi = stat["ci"]
            assert lo <= stat["value"] + 1e-12 and stat["value"] <= hi + 1e-12
        # monotone in k; maj@1 = pass@1 (a vote over one sample is that sample)
        values = [m["pass_at_k"][str(k)]["value"] for k in (1, 2, 4, 8)]
        assert values == sorted(values)
        assert m["maj_at_k"]["1"]["value"] == pytest.approx(m["pass_at_k"]["1"]["value"])
        lengths = [s["length"] for s in samples if s["model"] == m["name"] and s["kind"] == "sampled"]
        assert m["response_len_mean"]["value"] == pytest.approx(sum(lengths) / len(lengths))
        for key in ("greedy_accuracy", "reward_mean", "distinct_1", "distinct_correct_answers"):
            assert set(m[key]) >= {"value", "ci"}
    # the report (postrl report --eval) reads this file: both curves with their CIs
    from postrl.eval.report import parse_eval

    parsed = parse_eval(result)
    assert len(parsed) == 2 and all(sorted(p.pass_at_k) == [1, 2, 4, 8] for p in parsed)
    assert all(p.pass_at_k[8][1] is not None for p in parsed)

    # never overwrites an earlier evaluation
    assert main(argv) == 2
    assert "already holds eval.json" in capsys.readouterr().err


def test_postrl_eval_rejects_bad_arguments(tiny_model_dir, copy_task, tmp_path, capsys):
    base = ["eval", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x")]
    assert main(base + ["--task", str(copy_task), "--n", "4", "--k", "1,8"]) == 2
    assert "every k must be in [1, n=4]" in capsys.readouterr().err
    assert main(base + ["--task", "no_such_task_xyz:size=3"]) == 2
    assert "valid task specs" in capsys.readouterr().err
    assert main(base + ["--n", "2"]) == 2  # no --task and the model is not a run directory
    assert "--task is required" in capsys.readouterr().err


def test_task_specs():
    assert parse_task_spec("basic_arithmetic:size=10,seed=7,operators=[+,-]") == (
        "basic_arithmetic", {"size": 10, "seed": 7, "operators": ["+", "-"]})
    assert parse_task_spec("data/a:b.jsonl") == ("data/a:b.jsonl", {})  # a colon that is not options
    with pytest.raises(TaskSpecError, match="given twice"):
        parse_task_spec("champ:size=1,size=2")
    task = build_task("basic_arithmetic:size=5,seed=3,min_terms=2,max_terms=2")
    assert len(task.problems) == 5 and task.source.task_kwargs == {"min_terms": 2, "max_terms": 2}
    # the same held-out problems as a training run with data.seed=3 and the default train_size
    from postrl.config import load_config
    from postrl.data import build_data_source

    cfg = load_config(None, ["data.seed=3", "data.eval_size=5", "data.task_kwargs={min_terms: 2, max_terms: 2}"])
    assert [s.question for s in build_data_source(cfg).eval] == [s.question for s in task.problems]
    with pytest.raises(TaskSpecError, match="unknown option"):
        build_task("champ:sizes=3")


def test_jsonl_task_uses_every_record(copy_task):
    task = build_task(str(copy_task))
    assert len(task.problems) == 200 and task.problems[0].uid == "copy.jsonl:1"
    assert len(build_task(f"{copy_task}:size=7").problems) == 7


@pytest.mark.skipif(importlib.util.find_spec("champ_dataset") is None,
                    reason="PyPI package champ-dataset is not installed")
def test_champ_task_and_scoring():
    task = build_task("champ:size=4,category=Combinatorics")
    assert len(task.problems) == 4 and all(s.metadata["category"] == "Combinatorics" for s in task.problems)
    assert "\\boxed{}" in task.prompt_template.format(question="Q")
    assert task.source.answer_extraction == "boxed" and len(build_task("champ").problems) == 270
    s = next(p for p in task.problems if p.uid == "champ/P_Combinatorics_2")  # "@@C(10, 5)@@, or equivalently @@252@@"
    assert task.source.score("so the answer is \\boxed{252}", s) == 1.0
    assert task.source.score("\\boxed{\\binom{10}{5}}", s) == 1.0
    assert task.source.score("\\boxed{251}", s) == 0.0
    assert task.source.score("252 without a box", s) == 0.0
    assert champ_gold_candidates("@@C(10, 5)@@, or equivalently @@252@@") == ["$C(10, 5)$", "$252$"]
    assert champ_gold_candidates("@@n@@ times") == ["$n$ times"]
    assert champ_score("@@2^(n-1)@@", "2^{n-1}") == 1.0
    assert champ_score("@@2^(n-1)@@", "2^n") == 0.0
    assert champ_score("98 values", "98") == 1.0
    assert champ_score("No", "no.") == 1.0 and champ_score("No", "Yes") == 0.0


def test_heldout_eval_greedy_and_pass_at_k(tiny_model_dir, copy_task):
    from postrl.data import build_messages, render_prompt
    from postrl.models.loading import load_model_and_tokenizer
    from postrl.rollout import SamplingParams, build_backend

    model, tok, _ = load_model_and_tokenizer(str(tiny_model_dir), device="cpu")
    model.train()
    backend = build_backend("torch", model, tok)
    task = build_task(f"{copy_task}:size=6")
    render = lambda s: render_prompt(tok, build_messages(s))  # noqa: E731
    ev = heldout_eval(backend, tok, task.source, task.problems, render, 2, batch_size=8, n=4, ks=[1, 4])
    assert set(ev) >= {"accuracy", "reward_mean", "response_len_mean", "n", "examples", "pass@k"}
    assert ev["n"] == 6 and sorted(ev["pass@k"]) == ["1", "4"] and ev["pass@k"]["1"] <= ev["pass@k"]["4"]
    assert model.training  # restored after evaluation
    prompts = [render(s) for s in task.problems]
    # the greedy figures are those of the greedy completions, scored by the task
    greedy = generate_and_score(backend, tok, task.source, task.problems, prompts, 1,
                                SamplingParams(2, temperature=0.0))
    assert ev["accuracy"] == pytest.approx(sum(r[0] for r in greedy.correct) / 6)
    assert ev["reward_mean"] == pytest.approx(sum(r[0] for r in greedy.scores) / 6)
    assert ev["response_len_mean"] == pytest.approx(sum(r[0] for r in greedy.lengths) / 6)
    a, b, c = (generate_and_score(backend, tok, task.source, task.problems, prompts, 3, SamplingParams(2), seed=seed,
                                  batch_size=7) for seed in (5, 5, 6))
    assert a.texts == b.texts and len(a.texts) == 6 and all(len(r) == 3 for r in a.texts)
    assert a.texts != c.texts  # the seed is used


def test_train_periodic_eval_with_pass_at_k_and_eval_of_the_run(tiny_config, tmp_path, capsys):
    from postrl.config import ConfigError, load_config
    from postrl.trainer import train

    with pytest.raises(ConfigError, match="eval.k.0"):
        load_config(None, ["eval.k=[4]"])  # k without eval.n samples
    cfg = tiny_config("train.steps=2", "eval.every=1", "eval.n=4", "eval.before=true", "eval.after=true")
    run_dir, results = train(cfg)
    for ev in (results["eval_before"], results["eval_during"][0], results["eval_after"]):
        assert {"accuracy", "reward_mean", "response_len_mean", "n"} <= set(ev)
        assert sorted(ev["pass@k"], key=int) == ["1", "2", "4"] and ev["samples_per_problem"] == 4
    rows = read_metrics(run_dir)
    assert "eval/accuracy" in rows[0] and "eval/pass@4" in rows[0] and "reward_mean" in rows[0]
    assert "eval/accuracy" not in rows[1]  # the last step is covered by eval_after

    # the run directory as a --model: its latest checkpoint, on its own held-out set, into RUN_DIR/eval
    capsys.readouterr()
    assert main(["eval", "--model", str(run_dir), "--n", "2", "--bootstrap", "50"]) == 0
    result = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert result["num_problems"] == 20 and result["models"][0]["run_dir"] == str(run_dir)
    assert "checkpoints" in result["models"][0]["loaded_from"]


def test_output_dir_and_labels(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = resolve_out_dir(None)
    (first / "eval.json").write_text("{}")
    second = resolve_out_dir(None)
    assert first.name == "eval" and second.name == "eval-2"
    with pytest.raises(EvalError, match="already holds eval.json"):
        resolve_out_dir(first)
    assert model_labels(["org/a", "org/b"]) == ["org/a", "org/b"]
    assert model_labels(["org/a", "org/a"]) == ["org/a#1", "org/a#2"]
