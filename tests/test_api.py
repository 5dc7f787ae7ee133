"""The Python API (postrl.train & co., docs/python-api.md): the documented example runs as written, configs as
path / dict / Config with overrides, Python rewards of each shape inside a real (tiny) training run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import postrl
from postrl.api import RunResult, load, run_command
from postrl.config import Config, ConfigError, RewardSpec
from postrl.rewards import REWARDS

DOC = Path(__file__).resolve().parent.parent / "docs" / "python-api.md"

TINY = {  # a few seconds on one CPU thread: tiny random model, toy task, 2 steps
    "model": {"name_or_path": "tiny:seed=0,hidden_size=64,num_layers=2"},
    "data": {"source": "toy", "task": "copy", "task_kwargs": {"length": 3}, "train_size": 32, "eval_size": 8,
             "answer_extraction": "raw"},
    "rollout": {"n": 4, "max_new_tokens": 5},
    "train": {"steps": 2, "prompts_per_step": 2, "lr": 1e-3},
    "eval": {"before": False, "after": False},
    "run": {"name": "api", "progress": False, "threads": 1},
}


def _python_names() -> set[str]:
    return {name for name in REWARDS if name.startswith("python:")}


def _doc_example() -> str:
    """The first ```python block under '## Example' in docs/python-api.md."""
    text = DOC.read_text()
    section = text.split("## Example", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "docs/python-api.md: no python block under '## Example'"
    return match.group(1)


def test_import_postrl_is_cheap():
    out = subprocess.run([sys.executable, "-c", "import sys, postrl; print(sorted(m for m in sys.modules "
                          "if m.split('.')[0] in ('torch', 'transformers', 'numpy')))"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_documented_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example writes runs/ into the working directory
    namespace: dict = {"__name__": "__doc_example__"}
    exec(compile(_doc_example(), str(DOC), "exec"), namespace)  # noqa: S102 - our own documentation
    result = namespace["result"]
    assert isinstance(result, RunResult)
    assert result.run_dir.is_dir() and result.run_dir.resolve().parent == (tmp_path / "runs").resolve()
    assert (result.run_dir / "metrics.jsonl").is_file() and (result.run_dir / "config.yaml").is_file()
    rows = result.metrics
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:  # the TRL-style reward ran every step, without errors, with values in [0, 1]
        assert 0.0 <= row["reward/python:shares_symbols"] <= 1.0
        assert row["reward_errors"] == 0
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert [r["name"] for r in saved["rewards"]] == ["python:shares_symbols"]
    assert result.config.train.steps == 3
    assert not _python_names()  # unregistered after the call


def test_config_as_path_dict_or_config_with_overrides_gives_the_same_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    overrides = ("train.steps=4", "rollout.n=8")
    from_path = load("train", path, *overrides)
    from_dict = load("train", TINY, list(overrides))
    from_config = load("train", load("train", TINY), *overrides)
    assert from_path == from_dict == from_config
    assert from_path.train.steps == 4 and from_path.rollout.n == 8 and from_path.data.task == "copy"
    assert TINY["train"]["steps"] == 2  # the caller's dict is not changed
    assert load("train", "train.steps=7").train.steps == 7  # a leading key=value overrides the default recipe
    assert load("train").model.name_or_path == load("train", postrl.api.RECIPES / "quickstart.yaml").model.name_or_path


def test_bad_input_is_a_clear_type_or_config_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a run started by mistake would write runs/ here
    with pytest.raises(TypeError, match="config must be a YAML path, a dict"):
        postrl.train(42)
    with pytest.raises(TypeError, match="overrides must be strings"):
        postrl.train(TINY, 5)
    with pytest.raises(ConfigError, match="trian"):
        postrl.train(TINY, "trian.steps=3")
    with pytest.raises(ConfigError, match="unknown command 'trian'.*Did you mean 'train'"):
        run_command("trian", TINY)
    with pytest.raises(TypeError, match="not a reward"):
        postrl.train(TINY, rewards=["task", 3.0])
    with pytest.raises(TypeError, match="cannot tell how to call it"):
        postrl.train(TINY, rewards=[lambda text, gold: 0.0])
    with pytest.raises(TypeError, match="extend_rewards=True needs rewards"):
        postrl.train(TINY, extend_rewards=True)
    assert not _python_names()
    assert not list(tmp_path.iterdir())  # nothing was started


def test_registration_is_undone_when_the_trainer_fails(tmp_path):
    def never_called(prompts, completions, **kwargs):
        raise AssertionError("no rollout happens")

    cfg = dict(TINY, data=dict(TINY["data"], task="no_such_task"))
    with pytest.raises(ValueError, match="no_such_task"):
        postrl.train(cfg, f"run.output_dir={tmp_path}", rewards=[never_called])
    assert not _python_names()


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """One tiny training run with a TRL-style reward, a postrl per-completion function (weighted), a TRL-style
    function that returns the wrong number of values, and the config's own `task` reward (extend_rewards)."""
    calls: dict[str, list] = {"trl": [], "per_completion": []}

    def trl_style(prompts, completions, completion_ids, answer, task, rejected, **kwargs):
        calls["trl"].append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids,
                                 answer=answer, task=task, rejected=rejected, prompt_ids=kwargs["prompt_ids"],
                                 question=kwargs["question"]))
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    def per_completion(completion, sample):
        calls["per_completion"].append((completion, sample))
        return 0.25

    def wrong_length(prompts, completions, **kwargs):
        return [1.0]

    out = tmp_path_factory.mktemp("runs")
    cfg = load("train", TINY, f"run.output_dir={out}")
    assert isinstance(cfg, Config) and [r.name for r in cfg.rewards] == ["task"]
    result = postrl.train(cfg, rewards=[trl_style, (per_completion, 2.0), wrong_length], extend_rewards=True)
    return result, calls


def test_trl_style_reward_gets_text_prompts_answers_and_metadata_columns(mixed_run):
    result, calls = mixed_run
    assert len(calls["trl"]) == 2  # once per step (one rollout batch of 2 prompts x 4 completions)
    for call in calls["trl"]:
        assert len(call["completions"]) == 8
        assert all(isinstance(p, str) and "copy " in p for p in call["prompts"])  # text, chat template applied
        assert all(isinstance(ids, list) and all(isinstance(t, int) for t in ids) for ids in call["prompt_ids"])
        assert all(isinstance(ids, list) for ids in call["completion_ids"])
        assert all(q.startswith("copy ") for q in call["question"])
        assert all(q == f"copy {a}" for q, a in zip(call["question"], call["answer"]))  # the copy task
        assert call["task"] == ["toy-copy"] * 8 and len(call["rejected"]) == 8


def test_postrl_style_reward_and_weights(mixed_run):
    result, calls = mixed_run
    assert len(calls["per_completion"]) == 16  # once per completion
    completion, sample = calls["per_completion"][0]
    assert isinstance(completion, str) and sample.question.startswith("copy ")
    rows = result.metrics
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["reward/python:per_completion"] == pytest.approx(0.25)
        assert "reward/task" in row and "reward/python:trl_style" in row
    assert [(s.name, s.weight) for s in result.config.rewards] == [
        ("task", 1.0), ("python:trl_style", 1.0), ("python:per_completion", 2.0), ("python:wrong_length", 1.0)]


def test_wrong_length_is_a_counted_error_and_the_run_goes_on(mixed_run):
    result, _ = mixed_run
    for row in result.metrics:
        assert row["reward_errors/python:wrong_length/InvalidValue"] == 8
        assert row["reward_error_frac/python:wrong_length"] == 1.0
        assert row["reward/python:wrong_length"] == 0.0  # the failure score
        assert "reward_errors/python:trl_style/InvalidValue" not in row
    assert not _python_names()  # all unregistered after the call


def test_resume_needs_the_callables_again(mixed_run):
    result, _ = mixed_run
    with pytest.raises(ConfigError, match="python:trl_style.*registered in-process"):
        postrl.train(resume=result.run_dir, run_dir=None)


def test_evaluate_a_run_result_on_its_held_out_set(mixed_run, tmp_path):
    result, _ = mixed_run
    ev = postrl.evaluate([result], n=2, k=[1, 2], bootstrap=10, maj_subsets=2, out=tmp_path / "eval",
                         log=lambda line: None)
    assert ev.out_dir == tmp_path / "eval" and (ev.out_dir / "eval.json").is_file()
    assert ev.results["num_problems"] == 8 and len(ev.models) == 1
    assert set(ev.models[0]["pass_at_k"]) == {"1", "2"}
    with pytest.raises(TypeError, match="models"):
        postrl.evaluate([3])


def test_reward_spec_names_pass_through(tmp_path):
    from postrl.rewards import python_rewards

    with python_rewards([RewardSpec("task", weight=0.5), ("format", 0.1)]) as specs:
        assert [(s.name, s.weight) for s in specs] == [("task", 0.5), ("format", 0.1)]
    assert not _python_names()
