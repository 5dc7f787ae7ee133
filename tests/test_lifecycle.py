"""One run lifecycle for every trainer: Ctrl-C, crash while writing, resume of old checkpoints, final/.

Each test runs for every training command (RL, SFT, DPO offline and online, reward model) on the tiny model:
the interrupted, crashed or converted run, once resumed, must end with exactly the weights and metrics of a
run that was never stopped.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import postrl.run.lifecycle as lifecycle
from postrl.run import checkpoint as ckpt_mod
from postrl.run.checkpoint import STATE_FILE, latest_checkpoint, load_trainer_state, upgrade_state
from postrl.trainer.preference import train_dpo
from postrl.trainer.reward_model import train_rm
from postrl.trainer.rl import train
from postrl.trainer.sft import train_sft
from tests.conftest import read_metrics
from tests.test_dpo import write_pairs

PAIRS = ("preference.eval_size=8", "preference.batch_size=8", "preference.max_length=64",
         "preference.max_prompt_length=32", "preference.train_size=32", "preference.beta=0.5")
KINDS = {
    # name: (entry point, command, overrides, steps of the whole run)
    "rl": (train, "train", ("train.steps=4", "train.lr=1e-3", "run.threads=1"), 4),
    "sft": (train_sft, "sft", ("sft.batch_size=16", "sft.max_length=64", "sft.max_steps=4", "train.lr=3e-3",
                               "run.threads=1"), 4),
    "dpo": (train_dpo, "dpo", (*PAIRS, "train.lr=1e-3", "run.threads=1"), 4),
    "dpo_online": (train_dpo, "dpo", ("preference.online=true", "preference.rounds=2",
                                      "preference.prompts_per_round=8", "rollout.n=4", "rollout.max_new_tokens=3",
                                      "preference.batch_size=2", "preference.beta=0.5", "run.threads=1",
                                      # a reward that varies within a group, so rounds have pairs
                                      "rewards=[{name: length, mode: target, unit: chars, target: 3}]"), None),
    "rm": (train_rm, "rm", (*PAIRS, "train.lr=1e-3", "run.threads=1"), 4),
    # multi-turn episodes through the episode runner (postrl/rollout/episodes.py), with a held-out evaluation
    "rl_env": (train, "train", ("train.steps=4", "train.lr=1e-3", "run.threads=1", "rollout.max_new_tokens=4",
                                "env={name: maze, size: 3, max_turns: 3}", "env.max_episode_tokens=256",
                                "algo.advantage=gigpo", "eval.after=true", "data.eval_size=4"), 4),
}
TIME_KEYS = {"tokens_per_s", "gen_tokens_per_s", "step_time_s", "gen_time_s", "pairs_per_s"}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("lifecycle") / "pairs.jsonl", 48, seed=5)


@pytest.fixture
def make(tiny_config, pairs):
    def config(kind: str, name: str, *extra: str):
        fn, command, opts, _ = KINDS[kind]
        data = (f"preference.path={pairs}",) if kind in ("dpo", "rm") else ()
        return fn, command, tiny_config(*data, *opts, f"run.name={name}", "train.save_every=0", *extra)

    return config


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0) for k in wa)


def same_metrics(a: Path, b: Path, ignore: frozenset = frozenset()) -> None:
    ra, rb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in rb] == list(range(1, len(ra) + 1))
    skip = TIME_KEYS | ignore
    for x, y in zip(ra, rb):
        assert {k: v for k, v in x.items() if k not in skip} == pytest.approx(
            {k: v for k, v in y.items() if k not in skip}, abs=1e-6)


def interrupt_after_step(monkeypatch, step: int) -> list[int]:
    """A real Ctrl-C (SIGINT to this process) right after the metrics line of ``step`` is written."""
    fired: list[int] = []
    original = lifecycle.append_jsonl

    def append(path, record):
        original(path, record)
        if Path(path).name == lifecycle.METRICS_FILE and record["step"] == step and not fired:
            fired.append(step)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(lifecycle, "append_jsonl", append)
    return fired


@pytest.mark.parametrize("kind", list(KINDS))
def test_ctrl_c_then_resume_equals_an_uninterrupted_run(kind, make, monkeypatch, capsys):
    fn, command, cfg = make(kind, "straight")
    straight, full = fn(cfg)
    assert full["steps"] >= 3 and not full.get("interrupted")
    if KINDS[kind][3] is not None:
        assert full["steps"] == KINDS[kind][3]

    fired = interrupt_after_step(monkeypatch, 2)
    fn, _, cfg = make(kind, "split")
    split, res = fn(cfg)
    assert fired == [2] and res["interrupted"] is True
    out = capsys.readouterr().out
    assert f"interrupted at step 2" in out
    assert f"Resume with: postrl {command} {split / 'config.yaml'} --resume {split}" in out
    ckpt = latest_checkpoint(split / "checkpoints")
    assert ckpt.name == "step_000002" and load_trainer_state(ckpt)["run_state"]["step"] == 2
    assert json.loads((split / "results.json").read_text())["interrupted"] is True
    assert not (split / "final").exists()  # only a finished run publishes final/
    assert not [p for p in (split / "checkpoints").iterdir() if p.name.startswith(".")]

    monkeypatch.undo()
    resumed, res2 = fn(make(kind, "split")[2], resume=split)
    assert resumed == split and res2["steps"] == full["steps"] and "interrupted" not in res2
    same_metrics(straight, split)
    assert same_weights(Path(full["final_model"]), Path(res2["final_model"]))
    # final/ is the last checkpoint's model, loadable without the trainer state
    assert Path(res2["final_model"]) == split / "final" and not (split / "final" / STATE_FILE).exists()
    assert same_weights(split / "final", latest_checkpoint(split / "checkpoints"))


@pytest.mark.parametrize("kind", list(KINDS))
def test_crash_while_writing_a_checkpoint_loses_nothing(kind, make, monkeypatch):
    fn, _, cfg = make(kind, "straight")
    straight, full = fn(cfg)

    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("run_state", {}).get("step") == 2:
            Path(f).write_bytes(b"partial")  # half-written, then the disk is full
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    fn, _, cfg = make(kind, "crash", "train.save_every=1")
    with pytest.raises(OSError, match="No space left"):
        fn(cfg)
    run_dir = Path(cfg.run.output_dir) / "crash"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000001"]  # no partial leftovers
    monkeypatch.undo()
    _, res = fn(make(kind, "crash", "train.save_every=1")[2], resume=run_dir)
    assert res["steps"] == full["steps"]
    assert same_weights(Path(full["final_model"]), Path(res["final_model"]))
    same_metrics(straight, run_dir)


OLD_RUN_STATE = ("step", "consecutive_nonfinite", "nonfinite_total", "results", "wall_time_s")  # before the run package


def _old_shape(st: dict, kind: str) -> dict:
    """The trainer state as postrl wrote it before the run package: ``run_state`` beside the trainer's keys
    (train, sft) or the run counters flat beside them (dpo, rm)."""
    outer = {k: st[k] for k in ("optimizer", "scheduler", "rng")}
    run = {k: st["run_state"][k] for k in OLD_RUN_STATE}
    if kind in ("rl", "sft"):
        return {"run_state": run, **outer, **st["job"], **({"kind": "sft"} if kind == "sft" else {})}
    return {**run, **outer, **st["job"]}


@pytest.mark.parametrize("kind", list(KINDS))
def test_checkpoints_of_earlier_versions_resume(kind, make, monkeypatch):
    fn, _, cfg = make(kind, "straight")
    straight, full = fn(cfg)
    interrupt_after_step(monkeypatch, 2)
    fn, _, cfg = make(kind, "old")
    old, _ = fn(cfg)
    monkeypatch.undo()
    path = latest_checkpoint(old / "checkpoints") / STATE_FILE
    st = torch.load(path, weights_only=False)
    legacy = _old_shape(st, kind)
    assert "format" not in legacy
    assert upgrade_state(legacy)["run_state"] == {k: st["run_state"][k] for k in OLD_RUN_STATE}
    assert upgrade_state(legacy)["job"].keys() == st["job"].keys()
    torch.save(legacy, path)
    _, res = fn(make(kind, "old")[2], resume=old)
    assert res["steps"] == full["steps"]
    assert same_weights(Path(full["final_model"]), Path(res["final_model"]))
    same_metrics(straight, old, ignore=frozenset({"no_update_steps"}))  # a counter older checkpoints did not keep


def test_pipeline_crash_in_a_stage_checkpoint_resumes_to_the_same_weights(tiny_config, monkeypatch):
    from postrl.config import StageSpec
    from postrl.trainer.pipeline import STAGE_DONE, run_pipeline
    from tests.test_pipeline import SMALL, with_stages

    def make(name):
        return with_stages(tiny_config(*SMALL, "train.steps=3", "train.save_every=1", "eval.before=false",
                                       "eval.after=false", f"run.name={name}"),
                           StageSpec(kind="sft"), StageSpec(kind="grpo", name="rl"))

    _, straight = run_pipeline(make("straight"), log_fn=lambda s: None)
    real_save, seen = torch.save, []

    def failing_save(obj, f, *args, **kwargs):  # the RL stage's second checkpoint fails half-written
        if isinstance(obj, dict) and obj.get("kind") == "train" and obj["run_state"]["step"] == 2:
            seen.append(f)
            Path(f).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        run_pipeline(make("crash"), log_fn=lambda s: None)
    run_dir = Path(tiny_config().run.output_dir) / "crash"
    rl_dir = run_dir / "stages" / "02-rl"
    assert seen and (run_dir / "stages" / "01-sft" / STAGE_DONE).is_file() and not (rl_dir / STAGE_DONE).exists()
    assert sorted(p.name for p in (rl_dir / "checkpoints").iterdir()) == ["step_000001"]
    monkeypatch.undo()
    _, res = run_pipeline(make("crash"), resume=run_dir, log_fn=lambda s: None)
    assert [r["step"] for r in read_metrics(rl_dir)] == [1, 2, 3]
    assert same_weights(Path(straight["final_model"]), Path(res["final_model"]))
