"""Bad input, round two (issue 20): nothing silently wrong, nothing lost, no tracebacks, docs that cannot drift.

Every case gets exit code 2 (or the library's error), a message naming the input and what would be valid, no
Python traceback, and nothing written. The property test at the end feeds bad values to every config key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import typing
from pathlib import Path

import pytest
import torch

from postrl.cli import main
from postrl.config import Config, ConfigError, load_config, save_config
from postrl.run.checkpoint import latest_checkpoint, load_weights
from postrl.run.optim import parameters_finite
from postrl.trainer import TrainingError, train
from tests.conftest import read_metrics

FAST = ("run.threads=1",)
DOCS = Path(__file__).resolve().parent.parent / "docs"


def cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, out + err
    return code, err


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*")) if path.exists() else []


# ------------------------------------------------------------------------------------------------------------
# silently wrong or destructive before
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, key", [("train.lr=inf", "train.lr"), ("algo.kl_coef=inf", "algo.kl_coef"),
                                           ("train.lr=nan", "train.lr"), ("rollout.temperature=-inf", "rollout.temperature")])
def test_infinite_and_nan_values_are_refused(tiny_config, override, key):
    with pytest.raises(ConfigError, match=re.escape(key) + ".*not a finite number"):
        tiny_config(override)


def test_non_finite_parameters_roll_back_and_stop_with_finite_checkpoint(tiny_config, monkeypatch):
    """Whatever path leads to NaN weights (here: an infinite learning rate that slipped past validation), the step
    is rolled back to the latest checkpoint and counted; the run stops after the streak with finite weights."""
    from postrl.trainer.rl import RLTrainer

    original = RLTrainer.step

    def step(self, run):
        if run.state.step >= 2:  # from step 3 on, every update blows the weights up
            for group in self.optimizer.param_groups:
                group["lr"] = float("inf")
        return original(self, run)

    monkeypatch.setattr(RLTrainer, "step", step)
    monkeypatch.setattr(RLTrainer, "skip_zero_advantage", False)
    cfg = tiny_config("train.steps=10", "train.save_every=1", "train.keep_checkpoints=0", "train.max_nonfinite_steps=3",
                      *FAST)
    with pytest.raises(TrainingError, match="non-finite"):
        train(cfg)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and [r.get("rolled_back", 0) for r in rows] == [0, 0, 1, 1, 1]
    assert rows[-1]["nonfinite_steps"] == 3
    from safetensors.torch import load_file

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt.name == "step_000004"  # the streak stopped the run at step 5; steps 3-4 were rolled back
    good = load_file(str(run_dir / "checkpoints" / "step_000002" / "model.safetensors"))
    last = load_file(str(ckpt / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in last.values())  # no checkpoint of NaN weights was written
    assert all(torch.equal(good[k], last[k]) for k in good)  # the rolled-back weights are step 2's


def test_non_finite_parameters_without_a_checkpoint_stop_at_once(tiny_config, monkeypatch):
    from postrl.trainer.rl import RLTrainer

    original = RLTrainer.step

    def step(self, run):
        with torch.no_grad():
            next(self.model.parameters()).fill_(float("nan"))
        return original(self, run)

    monkeypatch.setattr(RLTrainer, "step", step)
    cfg = tiny_config("train.steps=3", *FAST)
    with pytest.raises(TrainingError, match="no checkpoint to roll back"):
        train(cfg)


def test_parameters_finite_and_load_weights(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert parameters_finite(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] = float("inf")
    assert not parameters_finite(model)
    load_weights(model, tiny_model_dir)
    assert parameters_finite(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_report_never_overwrites_a_runs_files(tiny_config, capsys):
    run_dir, _ = train(tiny_config("train.steps=1", *FAST))
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    for out in (run_dir / "metrics.jsonl", run_dir / "results.json", run_dir / "config.yaml",
                latest_checkpoint(run_dir / "checkpoints") / "report.html", run_dir):
        code, err = cli(capsys, "report", str(run_dir), "--out", str(out))
        assert code == 2 and f"--out {out}" in err, err
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics
    code, _ = cli(capsys, "report", str(run_dir), "--out", str(run_dir / "elsewhere.html"))
    assert code == 0 and (run_dir / "elsewhere.html").read_text().startswith("<!DOCTYPE html")


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "."])
def test_run_name_stays_inside_the_output_directory(tiny_config, name):
    with pytest.raises(ConfigError, match="run.name.*plain directory name"):
        tiny_config(f"run.name={name}")


def test_resume_with_another_model_or_fewer_steps_changes_nothing(tiny_config, tmp_path):
    run_dir, _ = train(tiny_config("train.steps=2", *FAST))
    before = {p.name: p.read_bytes() for p in (run_dir / "config.yaml", run_dir / "results.json", run_dir / "metrics.jsonl")}
    with pytest.raises(TrainingError, match=r"model.name_or_path: .* -> 'tiny'"):
        train(tiny_config("train.steps=4", "model.name_or_path=tiny", *FAST), resume=run_dir)
    with pytest.raises(TrainingError, match="already done 2 steps, more than the 1"):
        train(tiny_config("train.steps=1", *FAST), resume=run_dir)
    assert {p: (run_dir / p).read_bytes() for p in before} == before


def test_reward_kwarg_the_function_does_not_take(tiny_config, capsys, tmp_path):
    cfg = tiny_config("rewards=[{name: math, bogus: 1}]", *FAST)
    with pytest.raises(ConfigError, match=r"rewards.0 \(math\): math_reward takes no argument 'bogus'; valid: "):
        train(cfg)
    assert not Path(cfg.run.output_dir).exists()


def test_duplicate_yaml_section_is_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  lr: 1e-5\nrollout:\n  n: 4\ntrain:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"'train' is given twice .*lines 1 and 5"):
        load_config(path)


def test_no_update_steps_are_counted_shown_and_warned(tiny_config, capsys):
    # a reward every completion gets alike (1 token each, the target length): every advantage is 0
    run_dir, res = train(tiny_config("train.steps=3", "rewards=[{name: length, mode: target, unit: tokens, target: 1}]",
                                     "run.progress=true", *FAST))
    rows = read_metrics(run_dir)
    assert [r["updated"] for r in rows] == [0, 0, 0] and rows[-1]["no_update_steps"] == 3
    assert res["no_update_steps"] == 3 and "3 of 3 steps applied no update" in res["warnings"][0]
    out = capsys.readouterr()
    assert "no-update=3" in out.out + out.err and "warning: 3 of 3 steps applied no update" in out.out + out.err


def test_eval_rejects_zero_budget_and_unknown_device(capsys, tmp_path):
    for flags, text in ((["--max-new-tokens", "0"], "max_new_tokens=0: must be >= 1"),
                        (["--device", "gpu"], "device='gpu'"), (["--temperature", "nan"], "temperature=nan"),
                        (["--threads", "-1"], "--threads -1")):
        code, err = cli(capsys, "eval", "--model", "tiny", "--task", "basic_arithmetic:size=2", "--n", "1",
                        "--out", str(tmp_path / "e"), *flags)
        assert code == 2 and text in err, (flags, err)
    assert not (tmp_path / "e").exists()


# ------------------------------------------------------------------------------------------------------------
# tracebacks before
# ------------------------------------------------------------------------------------------------------------


def test_output_directory_that_is_a_file_or_read_only(tiny_config, capsys, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    cfg_path = save_config(tiny_config(f"run.output_dir={blocker}", *FAST), tmp_path / "c.yaml")
    code, err = cli(capsys, "train", str(cfg_path))
    assert code == 2 and "is a file, not a directory" in err
    code, err = cli(capsys, "eval", "--model", "tiny", "--task", "basic_arithmetic:size=2", "--n", "1",
                    "--out", str(blocker))
    assert code == 2 and "a file, not a directory" in err
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        cfg_path = save_config(tiny_config(f"run.output_dir={ro}", *FAST), tmp_path / "r.yaml")
        code, err = cli(capsys, "train", str(cfg_path))
        assert code == 2 and "not writable" in err


def test_non_utf8_config_template_placeholder_and_directory_config(tiny_config, capsys, tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    code, err = cli(capsys, "train", str(bad))
    assert code == 2 and "not UTF-8" in err
    code, err = cli(capsys, "train", str(tmp_path))
    assert code == 2 and "is a directory, not a YAML file" in err
    with pytest.raises(ConfigError, match="placeholders 'answer'"):
        tiny_config("data.prompt_template='Q: {question} A: {answer}'")


def test_tiny_spec_whose_sizes_do_not_divide(tiny_config, tmp_path):
    from postrl.models.loading import ModelLoadError

    cfg = tiny_config("model.name_or_path=tiny:hidden_size=30,num_heads=4", f"model.cache_dir={tmp_path}", *FAST)
    with pytest.raises(ModelLoadError, match="multiple of num_heads"):
        train(cfg)
    assert not Path(cfg.run.output_dir).exists() and not files_under(tmp_path / "models")


# ------------------------------------------------------------------------------------------------------------
# misleading messages before
# ------------------------------------------------------------------------------------------------------------


def test_misleading_messages_are_now_precise(tiny_config, capsys, tmp_path, copy_task):
    from postrl.data.sources import DataError, read_json_lines
    from postrl.eval.tasks import TaskSpecError, build_task

    with pytest.raises(DataError, match="is a directory, not a JSONL file"):
        read_json_lines(tmp_path)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + copy_task.read_bytes())  # a UTF-8 byte-order mark is tolerated
    assert read_json_lines(bom)[0][1] == json.loads(copy_task.read_text().splitlines()[0])
    code, err = cli(capsys, "train", "--resume", str(copy_task))
    assert code == 2 and "a file, not a run directory" in err and "checkpoints/" not in err.split("(")[0]
    code, err = cli(capsys, "train", "--resume", str(tmp_path / "missing"))
    assert code == 2 and "no such run directory" in err
    with pytest.raises(ConfigError, match="not on the Python path"):
        train(tiny_config("rewards=[{name: 'no_such_module_xyz:score'}]", *FAST))
    with pytest.raises(TaskSpecError, match="must be key=value, got 'size'"):
        build_task("basic_arithmetic:size")
    # the second --model is missing: found before the first is evaluated, nothing left in --out
    out = tmp_path / "ev"
    code, err = cli(capsys, "eval", "--model", "tiny", "--model", str(tmp_path / "nope"), "--task",
                    "basic_arithmetic:size=2", "--n", "1", "--out", str(out))
    assert code == 2 and "no such model or run directory" in err and not out.exists()


def test_batch_size_errors_come_together_with_values_that_work():
    with pytest.raises(ConfigError) as err:
        load_config(Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml",
                     ["train.prompts_per_step=2", "rollout.n=4"])
    msg = str(err.value)
    assert "train.mini_batch_size=16 must divide the rollout batch size 8" in msg
    assert "train.micro_batch_size=16 must then divide" in msg
    assert "e.g. train.mini_batch_size=8 train.micro_batch_size=8" in msg
    load_config(Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml",
                ["train.prompts_per_step=2", "rollout.n=4", "train.mini_batch_size=8", "train.micro_batch_size=8"])


# ------------------------------------------------------------------------------------------------------------
# docs that cannot drift
# ------------------------------------------------------------------------------------------------------------


def config_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the config tree; list fields of dataclasses as ``section.N.key``."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        tp, path = hints[f.name], f"{prefix}{f.name}"
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            keys += config_keys(tp, path + ".")
        elif typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
            keys += config_keys(args[0], path + ".N.")
        else:
            keys.append(path)
    return keys


def test_every_config_key_is_documented():
    text = (DOCS / "configuration.md").read_text()
    missing = [k for k in config_keys() if f"`{k}`" not in text]
    assert not missing, f"config keys without a row in docs/configuration.md: {missing}"


def test_every_registered_name_is_documented():
    from postrl.algorithms import ADVANTAGES, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
    from postrl.algorithms.preference import PREFERENCE_LOSSES
    from postrl.rewards import REWARDS, _load_builtins
    from postrl.rollout.backend import BACKENDS
    from postrl.run.trackers import TRACKERS

    _load_builtins()
    docs = "\n".join(p.read_text() for p in DOCS.glob("*.md"))
    registries = {"advantage": ADVANTAGES, "policy loss": POLICY_LOSSES, "aggregation": LOSS_AGGREGATIONS,
                  "KL estimator": KL_ESTIMATORS, "preference loss": PREFERENCE_LOSSES, "backend": BACKENDS,
                  "tracker": TRACKERS, "reward": {k: v for k, v in REWARDS.items() if not k.startswith("python:")}}
    try:
        from postrl.envs import ENVS  # the agents package, when present
        registries["environment"] = ENVS
    except ImportError:
        pass
    def shipped(obj) -> bool:  # registered by postrl itself, not by a test module of this run
        fn = getattr(obj, "fn", obj)
        return (getattr(fn, "__module__", "") or "").startswith("postrl")

    missing = [f"{kind} {name}" for kind, reg in registries.items() for name, obj in reg.items()
               if shipped(obj) and f"`{name}`" not in docs]
    assert not missing, f"registered names that no page of docs/ mentions: {missing}"


def test_train_help_points_to_the_configuration_docs(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "docs/configuration.md" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------------
# property test: bad values for every config key
# ------------------------------------------------------------------------------------------------------------


def bad_values(tp: typing.Any) -> list[str]:
    """Override values that no key of type ``tp`` accepts."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return bad_values(inner[0]) if len(inner) == 1 else ["{a: [1]}"]
    if tp is bool:
        return ["maybe", "2", "[true]"]
    if tp is int:
        return ["abc", "1.5", "inf", "[1]"]
    if tp is float:
        return ["abc", "nan", "inf", "-inf", "[1.0]"]
    if tp is str:
        return ["[1, 2]", "{a: 1}"]
    if origin is list:
        return ["{a: 1}", "7"]
    if origin is dict:
        return ["[1, 2]", "7"]
    return ["{a: [1]}"]


def test_random_bad_values_for_every_key_exit_2_without_traceback_or_files(tiny_config, capsys, tmp_path):
    out_dir = tmp_path / "runs"
    base = save_config(tiny_config(f"run.output_dir={out_dir}", *FAST), tmp_path / "base.yaml")
    rng = random.Random(0)
    cases = []
    for key in config_keys():
        if ".N." in key:
            continue
        section, name = key.split(".", 1) if "." in key else (key, None)
        cls = Config
        tp = typing.get_type_hints(cls)[section]
        for part in key.split(".")[1:]:
            tp = typing.get_type_hints(tp)[part]
        for value in rng.sample(bad_values(tp), k=min(2, len(bad_values(tp)))):
            cases.append(f"{key}={value}")
    cases += ["rewards.0.weight=nan", "rewards.0.timeout_s=inf", "stages=7", "rewards=abc", "data.path=/no/such.jsonl"]
    assert len(cases) > 150
    for override in cases:
        code, err = cli(capsys, "train", str(base), override)
        assert code == 2, (override, err)
        assert err.startswith("postrl: error:"), (override, err)
    assert not out_dir.exists() or not any(out_dir.iterdir())


EVAL_BAD_FLAGS = {"--n": ["0", "-3"], "--k": ["0", "1,x", "128"], "--temperature": ["nan", "0", "-1"],
                  "--top-p": ["0", "1.5", "nan"], "--max-new-tokens": ["0", "-5"], "--batch-size": ["0"],
                  "--seed": ["-1"], "--bootstrap": ["0"], "--maj-subsets": ["0"], "--device": ["gpu", "cuda:x"],
                  "--dtype": ["fp8"], "--threads": ["-2"], "--task": ["basic_arithmetic:size", "no_such_task_xyz"],
                  "--answer-extraction": ["whatever"], "--prompt-template": ["{question} {answer}"]}


def test_bad_values_for_every_eval_flag_exit_2_without_traceback_or_files(capsys, tmp_path):
    out = tmp_path / "e"
    for flag, values in EVAL_BAD_FLAGS.items():
        for value in values:
            argv = ["eval", "--model", "tiny", "--task", "basic_arithmetic:size=2", "--n", "4", "--out", str(out),
                    flag, value]
            try:
                code, err = cli(capsys, *argv)
            except SystemExit as exc:  # argparse's own refusal (a choice or type): exit 2 with its usage line
                code, err = exc.code, capsys.readouterr().err
            assert code == 2, (flag, value, err)
            assert "error" in err, (flag, value, err)
            assert not out.exists(), (flag, value)
