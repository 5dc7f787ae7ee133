"""Checkpoints, resume, run directories and Ctrl-C: a run can always be continued exactly.

All runs use the tiny random Llama on the JSONL copy task (about 0.1 s per step, one thread).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import read_metrics
import torch
from safetensors.torch import load_file

from postrl.config import save_config
from postrl.trainer import TrainingError, train
from postrl.run import checkpoint as ckpt_mod
from postrl.run.checkpoint import latest_checkpoint, list_checkpoints, load_trainer_state, save_checkpoint

# a config in which learning happens: sampled completions (temperature 1), groups of 4, lr 1e-3
LEARN = ("train.lr=1e-3", "rollout.n=4", "rollout.temperature=1.0", "run.threads=1")
TIME_KEYS = {"tokens_per_s", "gen_tokens_per_s", "step_time_s", "gen_time_s"}


def weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt_dir / "model.safetensors"))


def ckpt_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


# --------------------------------------------------------------------------------------------------------------
# 1. resume is exact
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_resume_is_exact(tiny_config, tiny_model_dir, kl_coef):
    # warmup over 4 steps makes the scheduler state matter (and does not depend on train.steps);
    # with a KL term the resumed run must reload the *original* model as its frozen reference
    opts = (*LEARN, "train.warmup_steps=4", f"algo.kl_coef={kl_coef}")
    straight_dir, _ = train(tiny_config(*opts, "train.steps=6", "train.save_every=0", "run.name=straight"))

    split_dir, res3 = train(tiny_config(*opts, "train.steps=3", "run.name=split"))
    assert res3["steps"] == 3
    assert latest_checkpoint(split_dir / "checkpoints").name == "step_000003"
    resumed_dir, res6 = train(tiny_config(*opts, "train.steps=6", "run.name=split"), resume=split_dir)
    assert resumed_dir == split_dir  # continues in place, no new run directory
    assert res6["steps"] == 6

    w_straight = weights(latest_checkpoint(straight_dir / "checkpoints"))
    w_resumed = weights(latest_checkpoint(split_dir / "checkpoints"))
    w_init = load_file(str(tiny_model_dir / "model.safetensors"))
    assert latest_checkpoint(straight_dir / "checkpoints").name == "step_000006"
    assert latest_checkpoint(split_dir / "checkpoints").name == "step_000006"
    assert set(w_straight) == set(w_resumed)
    for name in w_straight:
        assert torch.allclose(w_straight[name], w_resumed[name], atol=1e-6, rtol=0), name
    # the test means something only if training moved the weights
    moved = max(float((w_straight[k] - w_init[k]).abs().max()) for k in w_init if k in w_straight)
    assert moved > 1e-4

    m_straight, m_resumed = read_metrics(straight_dir), read_metrics(split_dir)
    assert [r["step"] for r in m_straight] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in m_resumed] == [1, 2, 3, 4, 5, 6]  # no duplicated or missing rows
    assert [r["reward_mean"] for r in m_straight] == [r["reward_mean"] for r in m_resumed]
    for a, b in zip(m_straight, m_resumed):
        for key in ("accuracy", "response_len_mean", "loss", "entropy", "kl", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)
        assert set(a) == set(b)
        if kl_coef:
            assert a["kl_ref"] == pytest.approx(b["kl_ref"], abs=1e-7) and a["kl_ref"] >= 0
            assert a["rows_computed_frac"] == 1.0  # a KL term makes every row matter
    if kl_coef:
        assert m_straight[0]["kl_ref"] < 1e-6 < m_straight[-1]["kl_ref"]  # starts at the reference, drifts
    # the reward signal was not constant, so the policy gradient was non-zero
    assert len({r["reward_mean"] for r in m_straight}) > 1
    assert [r["lr"] for r in m_straight] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])  # lr used in each step


def test_resume_truncates_metrics_written_after_the_checkpoint(tiny_config):
    # steps 1-4 logged, checkpoints at 2 and 4; resuming from an older checkpoint (as after a crash
    # between save_every boundaries) must drop the rows after it instead of duplicating them
    run_dir, _ = train(tiny_config(*LEARN, "train.steps=4", "train.save_every=2", "train.keep_checkpoints=0"))
    shutil.rmtree(run_dir / "checkpoints" / "step_000004")
    _, res = train(tiny_config(*LEARN, "train.steps=5", "train.save_every=2", "train.keep_checkpoints=0"),
                   resume=run_dir)
    assert res["steps"] == 5
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5]


def test_resume_without_checkpoint_is_a_clear_error(tiny_config, tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(TrainingError, match=r"--resume .*no complete checkpoint under .*checkpoints"):
        train(tiny_config(), resume=empty)
    assert list(empty.iterdir()) == []  # nothing written into the directory


# --------------------------------------------------------------------------------------------------------------
# 2. checkpoints are plain Hugging Face directories plus trainer_state.pt
# --------------------------------------------------------------------------------------------------------------


def test_checkpoint_is_plain_hugging_face(tiny_config, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = train(tiny_config("train.steps=2", "run.threads=1"))
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt == run_dir / "checkpoints" / "step_000002"
    assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()

    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    ref_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.chat_template == ref_tok.chat_template
    assert tok("copy 7")["input_ids"] == ref_tok("copy 7")["input_ids"]
    assert tok.eos_token == "<|end|>" and tok.pad_token == "<pad>"
    saved = weights(ckpt)
    for name, p in model.state_dict().items():
        if name in saved:
            assert torch.equal(p, saved[name]), name

    st = load_trainer_state(ckpt)
    assert st["run_state"]["step"] == 2
    assert {"optimizer", "scheduler", "rng", "job"} <= set(st) and st["format"] == 2 and st["kind"] == "train"
    assert st["optimizer"]["state"], "Adam moments must be saved"
    assert st["job"]["sampler"]["position"] == 2 * 4  # 2 steps x 4 prompts
    assert {"python", "numpy", "torch"} <= set(st["rng"])


# --------------------------------------------------------------------------------------------------------------
# 3. atomic writes and pruning
# --------------------------------------------------------------------------------------------------------------


def test_crash_while_saving_keeps_previous_checkpoint(tiny_config, monkeypatch):
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("run_state", {}).get("step") == 2:
            Path(f).write_bytes(b"partial")  # half-written file, then the disk fills up
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    cfg = tiny_config(*LEARN, "train.steps=3", "train.save_every=1", "train.keep_checkpoints=0")
    with pytest.raises(OSError, match="No space left"):
        train(cfg)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    root = run_dir / "checkpoints"
    assert ckpt_names(run_dir) == ["step_000001"]  # no step_000002, no .tmp-* or .old leftovers
    assert latest_checkpoint(root) == root / "step_000001"
    assert load_trainer_state(root / "step_000001")["run_state"]["step"] == 1

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(root / "step_000001")

    # the run can be continued from the surviving checkpoint
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    _, res = train(cfg, resume=run_dir)
    assert res["steps"] == 3
    assert ckpt_names(run_dir) == ["step_000001", "step_000002", "step_000003"]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]


class _FakeModel:
    def __init__(self, tag: str, fail: bool = False):
        self.tag, self.fail = tag, fail

    def save_pretrained(self, path, **kwargs):
        (Path(path) / "model.safetensors").write_text(self.tag)
        if self.fail:
            raise RuntimeError("interrupted mid-write")


class _FakeTokenizer:
    def save_pretrained(self, path, **kwargs):
        (Path(path) / "tokenizer.json").write_text("{}")


def test_save_checkpoint_failure_in_model_save_and_resave(tmp_path):
    root = tmp_path / "checkpoints"
    tok = _FakeTokenizer()
    p1 = save_checkpoint(root, 1, _FakeModel("one"), tok, {"run_state": {"step": 1}})
    assert p1 == root / "step_000001"

    # a new step fails inside save_pretrained: nothing named step_000002, no temp dir
    with pytest.raises(RuntimeError, match="mid-write"):
        save_checkpoint(root, 2, _FakeModel("two", fail=True), tok, {"run_state": {"step": 2}})
    assert sorted(p.name for p in root.iterdir()) == ["step_000001"]

    # re-saving an existing step that fails leaves the old copy intact
    with pytest.raises(RuntimeError, match="mid-write"):
        save_checkpoint(root, 1, _FakeModel("one-again", fail=True), tok, {"run_state": {"step": 1}})
    assert sorted(p.name for p in root.iterdir()) == ["step_000001"]
    assert (root / "step_000001" / "model.safetensors").read_text() == "one"

    # a successful re-save replaces it
    save_checkpoint(root, 1, _FakeModel("one-new"), tok, {"run_state": {"step": 1}})
    assert (root / "step_000001" / "model.safetensors").read_text() == "one-new"
    assert sorted(p.name for p in root.iterdir()) == ["step_000001"]

    # a directory without trainer_state.pt is not a checkpoint
    (root / "step_000009").mkdir()
    assert latest_checkpoint(root) == root / "step_000001"

    # keep=N prunes to the newest N complete checkpoints
    for step in (2, 3, 4):
        save_checkpoint(root, step, _FakeModel(str(step)), tok, {"run_state": {"step": step}}, keep=2)
    assert [p.name for p in list_checkpoints(root)] == ["step_000003", "step_000004"]


def test_keep_checkpoints_prunes_older_ones(tiny_config):
    run_dir, _ = train(tiny_config("train.steps=4", "train.save_every=1", "train.keep_checkpoints=2",
                                   "run.threads=1"))
    assert ckpt_names(run_dir) == ["step_000003", "step_000004"]
    run_all, _ = train(tiny_config("train.steps=3", "train.save_every=1", "train.keep_checkpoints=0",
                                   "run.threads=1", "run.name=keepall"))
    assert ckpt_names(run_all) == ["step_000001", "step_000002", "step_000003"]


# --------------------------------------------------------------------------------------------------------------
# 4. metrics.jsonl and results.json
# --------------------------------------------------------------------------------------------------------------

REQUIRED_METRICS = ("step", "reward_mean", "accuracy", "kl", "entropy", "response_len_mean", "tokens_per_s",
                    "step_time_s")


def test_metrics_and_results_files(tiny_config):
    run_dir, results = train(tiny_config("train.steps=3", "eval.before=true", "eval.after=true", "run.threads=1"))
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        missing = [k for k in REQUIRED_METRICS if k not in r]
        assert not missing, missing
        assert 0.0 <= r["reward_mean"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0
        assert r["response_len_mean"] == 1.0  # max_new_tokens=1
        assert r["tokens_per_s"] > 0 and r["step_time_s"] > 0
        assert r["entropy"] > 0 and r["kl"] >= 0
        assert r["reward_errors"] == 0 and r["nonfinite_steps"] == 0

    on_disk = json.loads((run_dir / "results.json").read_text())
    for key in ("eval_before", "eval_after"):
        assert set(on_disk[key]) >= {"accuracy", "n"}
        assert on_disk[key]["n"] == 20  # data.eval_size=20
        assert 0.0 <= on_disk[key]["accuracy"] <= 1.0
        assert on_disk[key] == json.loads(json.dumps(results[key]))
    assert on_disk["steps"] == 3 and on_disk["nonfinite_steps"] == 0
    assert (run_dir / "config.yaml").is_file()


# --------------------------------------------------------------------------------------------------------------
# 5. Ctrl-C through the CLI: checkpoint, exit 130, resume hint; then resume through the CLI
# --------------------------------------------------------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "postrl.cli", "train", *args]


def test_ctrl_c_checkpoints_and_resumes(tiny_config, tmp_path):
    cfg = tiny_config("train.steps=10000", "train.save_every=0", "run.threads=1", "run.name=ctrlc")
    cfg_path = save_config(cfg, tmp_path / "ctrlc.yaml")
    run_dir = Path(cfg.run.output_dir) / "ctrlc"
    metrics = run_dir / "metrics.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_cli(str(cfg_path)), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file() and metrics.read_text().strip():
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[0]
        assert metrics.is_file() and metrics.read_text().strip(), "no step finished within 60 s"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out
    assert "Ctrl-C" in out
    assert f"--resume {run_dir}" in out, out

    rows = read_metrics(run_dir)
    last = rows[-1]["step"]
    assert [r["step"] for r in rows] == list(range(1, last + 1))
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt == run_dir / "checkpoints" / f"step_{last:06d}"
    assert f"interrupted at step {last}" in out
    assert load_trainer_state(ckpt)["run_state"]["step"] == last
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ckpt)
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]

    # resume through the CLI, the way the message says, with a new step count
    target = last + 2
    res = subprocess.run(_cli(str(run_dir / "config.yaml"), "--resume", str(run_dir), f"train.steps={target}"),
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"run directory: {run_dir}" in res.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, target + 1))
    assert latest_checkpoint(run_dir / "checkpoints").name == f"step_{target:06d}"
    assert not (run_dir.parent / "ctrlc-2").exists()  # resumed in place


# --------------------------------------------------------------------------------------------------------------
# 6. a new run never overwrites an existing run directory
# --------------------------------------------------------------------------------------------------------------


def test_new_run_never_overwrites(tiny_config):
    first, _ = train(tiny_config("train.steps=2", "run.threads=1"))
    before = (first / "metrics.jsonl").read_text()
    w_before = weights(latest_checkpoint(first / "checkpoints"))

    second, _ = train(tiny_config("train.steps=1", "run.threads=1"))
    third, _ = train(tiny_config("train.steps=1", "run.threads=1"))
    assert first.name == "t"
    assert second == first.with_name("t-2")
    assert third == first.with_name("t-3")
    assert (first / "metrics.jsonl").read_text() == before
    assert ckpt_names(first) == ["step_000002"]
    w_after = weights(latest_checkpoint(first / "checkpoints"))
    assert all(torch.equal(w_before[k], w_after[k]) for k in w_before)
    assert [r["step"] for r in read_metrics(second)] == [1]
