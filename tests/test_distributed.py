"""Data-parallel training (postrl/run/distributed.py) on CPU with the gloo backend, 2 ranks, the tiny model.

- exactness: one update from a fixed rollout batch split over 2 ranks (DDP and FSDP2) gives the gradient and the
  parameters of one process on the whole batch (1e-5), for token-mean and sequence-mean aggregation, GRPO and
  RLOO; per-rank normalisers (what plain DDP averaging of per-rank token means gives) do not;
- the row layout keeps groups on one rank and reproduces the single process's mini batches;
- checkpoints: an FSDP checkpoint of 2 ranks resumes with 2 ranks and in 1 process (DCP reshards);
- end to end with torchrun: learning, Ctrl-C and resume, a rank that dies, configs that differ across ranks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from postrl.run import distributed
from postrl.run.distributed import RowLayout, rl_layout

ROOT = Path(__file__).resolve().parents[1]


# ----- running a function on 2 ranks ---------------------------------------------------------------------------


def _entry(rank: int, fn, world: int, init_file: str, args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        distributed.shutdown()
        dist.destroy_process_group()


def run_ranks(fn, tmp_path: Path, *args, world: int = 2, timeout_s: float = 240.0) -> None:
    """``fn(rank, world, *args)`` in ``world`` spawned processes joined in one gloo group; a failure in any rank
    fails the test with its traceback, a hang is killed after ``timeout_s``."""
    init_file = tmp_path / f"rendezvous-{time.monotonic_ns()}"
    ctx = mp.start_processes(_entry, args=(fn, world, str(init_file), args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks did not finish within {timeout_s:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)


# ----- the fixed rollout batch ---------------------------------------------------------------------------------

BASE = ("rollout.max_new_tokens=6", "rollout.temperature=1.5", "rollout.n=4", "train.prompts_per_step=4",
        "train.micro_batch_size=2", "train.lr=1e-4", "run.threads=1")


def fixed_batch(tiny_config, path: Path):
    """A rollout batch of 16 rows (4 groups of 4) with varied rewards and loss-mask lengths, so that the ranks
    hold different numbers of tokens and (after zero-advantage rows are skipped) of micro batches."""
    from postrl.trainer.rl import RLTrainer

    trainer = RLTrainer(tiny_config(*BASE))
    batch = trainer.rollout(0)
    trainer.close()
    B = len(batch)
    rewards = [float((3 * i + i // 4) % 5) for i in range(B)]
    rewards[8:12] = [1.0] * 4  # one group with equal rewards: zero advantages, its rows are skipped
    batch.rewards = torch.tensor(rewards, dtype=torch.float64)
    for i in range(B):  # loss masks of different lengths (a subset of the attention mask)
        keep = 1 + (i * 5) % int(batch.attention_mask[i].sum())
        batch.loss_mask[i, keep:] = 0.0
    batch.validate()
    torch.save(batch, path)
    return batch


def case_overrides(agg: str, adv: str, extra: tuple = ()) -> tuple[str, ...]:
    return (*BASE, f"algo.loss_agg={agg}", f"algo.advantage={adv}", *extra)


def capture_update(trainer, batch) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
    """The gradients the optimizer receives in each update (full tensors), the parameters after the step and the
    update's metrics."""
    grads: list[list[torch.Tensor]] = []
    step = trainer.optimizer.step

    def recording_step(*a, **k):
        grads.append([(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                      for p in trainer.params])
        return step(*a, **k)

    trainer.optimizer.step = recording_step
    metrics = trainer.update(batch, 0)
    d = distributed.current()
    params = d.full_state_dict(trainer.model) if d is not None else trainer.model.state_dict()
    return [g for update in grads for g in update], params, metrics


def _rank_updates(rank: int, world: int, cfg_dir: str, batch_path: str, cases: list, out_path: str) -> None:
    from postrl.config import load_config
    from postrl.trainer.rl import RLTrainer

    batch = torch.load(batch_path, weights_only=False)
    results = {}
    for name, strategy, overrides, reduce in cases:
        d = distributed.activate(strategy)
        d.reduce_normalisers = reduce
        trainer = RLTrainer(load_config(Path(cfg_dir) / "config.yaml", list(overrides)))
        local = batch.select(trainer.layout.rows_of[rank])
        results[name] = capture_update(trainer, local)
        trainer.close()
    if rank == 0:
        torch.save(results, out_path)


CASES = [(f"{s}-{agg}-{adv}", s, case_overrides(agg, adv), True)
         for s in ("ddp", "fsdp") for agg in ("token_mean", "seq_mean_token_mean") for adv in ("grpo", "rloo")]
CASES += [
    # two epochs of two mini batches each: four updates, rows of each mini batch spread over both ranks
    ("ddp-minibatches", "ddp", case_overrides("token_mean", "grpo", ("train.mini_batch_size=8", "train.epochs=2")),
     True),
    # the KL reference sharded like the policy; PPO's critic (GAE) sharded and trained first
    ("fsdp-kl-reference", "fsdp", case_overrides("token_mean", "grpo", ("algo.kl_coef=0.05",)), True),
    ("fsdp-ppo-critic", "fsdp", case_overrides("token_mean", "gae"), True),
    # truncated importance sampling: the trainer's forward of the rollout policy, its statistics over both ranks
    ("ddp-tis", "ddp", case_overrides("token_mean", "grpo", ("algo.tis_mode=clamp", "algo.tis_cap=1.05")), True),
    # per-rank token-mean: each rank divides by its own token count, DDP averages the two gradients
    ("ddp-per-rank-normaliser", "ddp", case_overrides("token_mean", "grpo"), False),
]


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    scale = max(float(g.abs().max()) for g in b)
    return len(a) == len(b) and all(torch.allclose(x, y, atol=1e-5 * scale, rtol=1e-5) for x, y in zip(a, b))


def test_two_ranks_update_equals_one_process(tiny_config, tmp_path):
    from postrl.config import save_config
    from postrl.trainer.rl import RLTrainer

    batch = fixed_batch(tiny_config, tmp_path / "batch.pt")
    save_config(tiny_config(), tmp_path / "config.yaml")
    expected = {}
    for name, _, overrides, _ in CASES:
        trainer = RLTrainer(tiny_config(*overrides))
        expected[name] = capture_update(trainer, batch)
        trainer.close()
    run_ranks(_rank_updates, tmp_path, str(tmp_path), str(tmp_path / "batch.pt"), CASES, str(tmp_path / "out.pt"))
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    for name, _, _, reduce in CASES:
        (g_grads, g_params, g_metrics), (e_grads, e_params, e_metrics) = got[name], expected[name]
        assert e_grads and max(float(g.abs().max()) for g in e_grads) > 0, name
        if not reduce:  # per-rank normalisers: a different gradient (the ranks hold different token counts)
            assert not _close(g_grads, e_grads), name
            continue
        assert _close(g_grads, e_grads), f"{name}: gradients differ from one process on the whole batch"
        # the update's metrics are those of the whole batch (sums and counts reduced over the ranks)
        assert g_metrics.keys() == e_metrics.keys()
        assert g_metrics == pytest.approx(e_metrics, rel=1e-4, abs=1e-6, nan_ok=True), name
        assert g_params.keys() == e_params.keys()
        for k in e_params:
            assert torch.allclose(g_params[k], e_params[k], atol=1e-5, rtol=1e-5), f"{name}: parameter {k}"


# ----- the row layout ------------------------------------------------------------------------------------------


def test_rl_layout_keeps_groups_on_one_rank_and_splits_each_mini_batch():
    # 8 prompts x n=4 = 32 rows; mini batch 8 rows = 2 groups: each rank gets one group of every mini batch
    groups0, lay0 = rl_layout(8, 4, 8, 2, 0)
    groups1, lay1 = rl_layout(8, 4, 8, 2, 1)
    assert groups0 == [0, 2, 4, 6] and groups1 == [1, 3, 5, 7]
    assert lay0.rows_of[0][:8] == [0, 1, 2, 3, 8, 9, 10, 11]
    assert sorted(lay0.rows_of[0] + lay0.rows_of[1]) == list(range(32))
    # mini batch 0 (global rows 0-7): 4 rows on each rank, as local positions in the order given
    assert lay0.local(torch.arange(8)).tolist() == [0, 1, 2, 3] and lay1.local(torch.arange(8)).tolist() == [0, 1, 2, 3]
    assert lay1.local(torch.tensor([12, 4, 0])).tolist() == [4, 0]
    # a mini batch that does not split evenly (6 rows = 1.5 groups): contiguous blocks of prompts
    groups, _ = rl_layout(8, 4, 6, 2, 1)
    assert groups == [4, 5, 6, 7]
    # assemble puts each rank's rows back in global order, padding narrower [B, T] parts
    lay = RowLayout([[0, 2], [1, 3]], 0)
    out = lay.assemble([torch.tensor([[1.0, 1.0], [3.0, 3.0]]), torch.tensor([[2.0], [4.0]])])
    assert out.tolist() == [[1.0, 1.0], [2.0, 0.0], [3.0, 3.0], [4.0, 0.0]]


def test_torchrun_without_a_strategy_is_refused(tiny_config, monkeypatch):
    from postrl.config import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="train.strategy=ddp"):
        distributed.init_distributed(tiny_config())
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_distributed(tiny_config("train.strategy=fsdp")) is None  # one process: no group


def test_strategy_config_is_validated(tiny_config):
    from postrl.config import ConfigError

    with pytest.raises(ConfigError, match="train.strategy='fdsp'.*Did you mean 'fsdp'"):
        tiny_config("train.strategy=fdsp")
    with pytest.raises(ConfigError, match="train.mixed_precision.*needs train.strategy=fsdp"):
        tiny_config("train.strategy=ddp", "train.mixed_precision=bf16")


def _rank_config_check(rank: int, world: int, cfg_dir: str) -> None:
    from postrl.config import ConfigError, load_config, to_dict

    cfg = load_config(Path(cfg_dir) / "config.yaml", [f"train.lr={1e-3 if rank == 0 else 2e-3}"])
    d = distributed.activate("ddp")
    with pytest.raises(ConfigError, match=r"rank\(s\) 1 differs from rank 0"):
        d.check_same("config", to_dict(cfg))


def test_configs_that_differ_across_ranks_are_refused(tiny_config, tmp_path):
    from postrl.config import save_config

    save_config(tiny_config(), tmp_path / "config.yaml")
    run_ranks(_rank_config_check, tmp_path, str(tmp_path))


# ----- checkpoints: DCP of 2 FSDP ranks, resumed with 2 ranks and with 1 process --------------------------------


def _full_optimizer_state(trainer) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    """The optimizer's state tensors by parameter name, gathered (on rank 0; empty on the others)."""
    osd = get_optimizer_state_dict(trainer.model, trainer.optimizer,
                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {f"{name}/{k}": v.clone() for name, st in osd.get("state", {}).items() for k, v in st.items()
            if isinstance(v, torch.Tensor) and v.dim() > 0}


def _rank_save_and_reload(rank: int, world: int, cfg_dir: str, batch_path: str, out_path: str) -> None:
    from postrl.config import load_config
    from postrl.run.checkpoint import latest_checkpoint
    from postrl.run.lifecycle import Run, RunState, _restore
    from postrl.trainer.rl import RLTrainer

    cfg = load_config(Path(cfg_dir) / "config.yaml", [*BASE, "train.strategy=fsdp"])
    run_dir = Path(cfg_dir) / "run"
    distributed.activate("fsdp")
    trainer = RLTrainer(cfg)
    batch = torch.load(batch_path, weights_only=False).select(trainer.layout.rows_of[rank])
    trainer.update(batch, 0)
    Run(cfg, trainer, run_dir, RunState(step=1)).save()
    params, optim = distributed.current().full_state_dict(trainer.model), _full_optimizer_state(trainer)
    trainer.close()
    # the same number of ranks: a fresh FSDP trainer restored from the checkpoint has the same state
    again = RLTrainer(load_config(Path(cfg_dir) / "config.yaml", [*BASE, "train.strategy=fsdp"]),
                      latest_checkpoint(run_dir / "checkpoints"))
    state = _restore(again, latest_checkpoint(run_dir / "checkpoints"), run_dir)
    assert state.step == 1
    params2, optim2 = distributed.current().full_state_dict(again.model), _full_optimizer_state(again)
    again.close()
    if rank == 0:
        assert all(torch.equal(params[k], params2[k]) for k in params)
        assert optim.keys() == optim2.keys() and all(torch.equal(optim[k], optim2[k]) for k in optim)
        torch.save((params, optim), out_path)


def test_fsdp_checkpoint_of_two_ranks_resumes_with_two_ranks_and_in_one_process(tiny_config, tmp_path):
    from postrl.config import save_config
    from postrl.run.checkpoint import SHARDED_DIR, latest_checkpoint, load_trainer_state
    from postrl.run.lifecycle import _restore
    from postrl.trainer.rl import RLTrainer

    fixed_batch(tiny_config, tmp_path / "batch.pt")
    save_config(tiny_config(), tmp_path / "config.yaml")
    run_ranks(_rank_save_and_reload, tmp_path, str(tmp_path), str(tmp_path / "batch.pt"), str(tmp_path / "full.pt"))
    params, optim = torch.load(tmp_path / "full.pt", weights_only=False)
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    st = load_trainer_state(ckpt)
    assert (ckpt / SHARDED_DIR).is_dir() and st["optimizer"] is None and st["world_size"] == 2
    assert len(st["rng_ranks"]) == 2
    # one process (M=1 != N=2): the Hugging Face files hold the gathered model, DCP gives the full optimizer state
    trainer = RLTrainer(tiny_config(*BASE), ckpt)
    assert _restore(trainer, ckpt, tmp_path / "run").step == 1
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, params[k]), k
    got = _full_optimizer_state(trainer)
    assert got.keys() == optim.keys() and all(torch.equal(got[k], optim[k]) for k in optim)
    trainer.close()


# ----- torchrun, end to end ------------------------------------------------------------------------------------

TIME_KEYS = {"tokens_per_s", "gen_tokens_per_s", "step_time_s", "gen_time_s", "pairs_per_s"}


def write_recipe(path: Path, model_dir: Path, data: Path, out: Path, **train) -> Path:
    """The tiny toy recipe of tests/test_learning.py (copy a digit, one generated token) as a YAML file."""
    import yaml

    cfg = {"model": {"name_or_path": str(model_dir)},
           "data": {"source": "jsonl", "path": str(data), "eval_size": 20, "answer_extraction": "raw"},
           "rollout": {"n": 8, "max_new_tokens": 1},
           "train": {"prompts_per_step": 16, "micro_batch_size": 128, "lr": 2e-3, "steps": 150, **train},
           "eval": {"before": True, "after": True}, "run": {"seed": 0, "output_dir": str(out), "progress": False}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun(args: list[str], cwd: Path, timeout_s: float = 300, nproc: int = 2, wait: bool = True):
    """``torchrun --standalone --nproc-per-node N -m postrl ARGS``; returns the finished (or running) process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "postrl",
           *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    if not wait:
        return proc
    try:
        proc.output = proc.communicate(timeout=timeout_s)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.output = proc.communicate()[0]
        raise
    return proc


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def test_torchrun_two_ranks_learn_the_toy_task_like_one_process(tiny_model_dir, copy_task, tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_model_dir, copy_task, tmp_path / "runs", strategy="ddp")
    proc = torchrun(["train", str(recipe), "run.name=ddp"], tmp_path, timeout_s=400)
    assert proc.returncode == 0, proc.output[-3000:]
    run_dir = tmp_path / "runs" / "ddp"
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 151))  # one metrics line per step: rank 0 alone writes
    first, last = (sum(r["reward_mean"] for r in rows[:5]) / 5, sum(r["reward_mean"] for r in rows[-10:]) / 10)
    assert first < 0.15 and last >= 0.9, (first, last)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["eval_before"]["accuracy"] < 0.2 and results["eval_after"]["accuracy"] >= 0.9
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert proc.output.count("run directory:") == 1  # the summary is printed once


@pytest.mark.slow  # three torchrun jobs: ~75 s on 2 CPU cores
def test_torchrun_ctrl_c_and_resume_with_two_fsdp_ranks_equals_an_uninterrupted_run(tiny_model_dir, copy_task,
                                                                                   tmp_path):
    from safetensors.torch import load_file

    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_model_dir, copy_task, tmp_path / "runs", strategy="fsdp",
                          steps=8, prompts_per_step=4, micro_batch_size=8)
    proc = torchrun(["train", str(recipe), "run.name=cut", "eval.before=false", "eval.after=false"], tmp_path,
                    wait=False)
    run_dir = tmp_path / "runs" / "cut"
    deadline = time.monotonic() + 300
    while len(metrics(run_dir)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGINT)  # Ctrl-C on torchrun: it forwards SIGINT to every rank
    out = proc.communicate(timeout=300)[0]
    results = json.loads((run_dir / "results.json").read_text())
    assert results.get("interrupted") is True, out[-3000:]
    cut = len(metrics(run_dir))
    assert 2 <= cut < 8
    assert (run_dir / "checkpoints" / f"step_{cut:06d}" / "sharded").is_dir()
    resumed = torchrun(["train", str(run_dir / "config.yaml"), "--resume", str(run_dir)], tmp_path)
    assert resumed.returncode == 0, resumed.output[-3000:]
    whole = torchrun(["train", str(recipe), "run.name=whole", "eval.before=false", "eval.after=false"], tmp_path)
    assert whole.returncode == 0, whole.output[-3000:]
    a, b = metrics(run_dir), metrics(tmp_path / "runs" / "whole")
    assert [r["step"] for r in a] == list(range(1, 9))
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in TIME_KEYS} == pytest.approx(
            {k: v for k, v in y.items() if k not in TIME_KEYS}, abs=1e-6)
    wa, wb = (load_file(str(d / "final" / "model.safetensors")) for d in (run_dir, tmp_path / "runs" / "whole"))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


CRASHING_REWARD = '''
import os

CALLS = [0]


def reward(completion, sample, **kwargs):
    """1 for every completion; rank 1 dies (os._exit) at its 40th call, i.e. in step 3."""
    CALLS[0] += 1
    if os.environ.get("RANK") == "1" and CALLS[0] == 40:
        os._exit(7)
    return 1.0
'''


def test_a_rank_that_dies_stops_the_run_naming_the_rank_and_the_last_checkpoint_loads(tiny_model_dir, copy_task,
                                                                                      tmp_path):
    from postrl.run.checkpoint import latest_checkpoint, load_trainer_state

    (tmp_path / "dying_reward.py").write_text(CRASHING_REWARD)
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_model_dir, copy_task, tmp_path / "runs", strategy="ddp",
                          steps=6, prompts_per_step=4, micro_batch_size=8, save_every=1)
    proc = torchrun(["train", str(recipe), "run.name=dies", "eval.before=false", "eval.after=false",
                     "rewards=[{name: 'dying_reward:reward'}]"], tmp_path, timeout_s=300)
    assert proc.returncode != 0
    assert "rank      : 1" in proc.output and "exitcode  : 7" in proc.output, proc.output[-3000:]
    run_dir = tmp_path / "runs" / "dies"
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt is not None and ckpt.name == "step_000002"  # step 3 never finished
    assert load_trainer_state(ckpt)["run_state"]["step"] == 2


# ----- SFT, DPO and the reward model on 2 ranks -------------------------------------------------------------------

PAIR_OPTS = ("preference.eval_size=4", "preference.max_length=64", "preference.max_prompt_length=32",
             "preference.train_size=24", "preference.beta=0.5", "train.lr=1e-4", "run.threads=1")
OTHER_KINDS = {  # kind: overrides (uneven shares: one rank runs a zero-weight pass)
    "sft": ("sft.batch_size=9", "sft.micro_batch_size=1", "sft.max_length=64", "train.lr=1e-4", "run.threads=1"),
    "dpo": (*PAIR_OPTS, "preference.batch_size=7", "preference.micro_batch_size=1"),
    "rm": (*PAIR_OPTS, "preference.batch_size=7", "preference.micro_batch_size=1"),
}


def one_step(kind: str, cfg, run_dir: Path):
    """Build the trainer of ``kind`` and take its first update; ``(gradients, parameters)`` as capture_update."""
    from types import SimpleNamespace

    from postrl.trainer.preference import PreferenceTrainer
    from postrl.trainer.reward_model import RewardModelTrainer
    from postrl.trainer.sft import SFTTrainer

    from postrl.run.rng import seed_everything

    seed_everything(cfg.run.seed)  # as run_job does: the reward model's new score head is the same everywhere
    trainer = {"sft": SFTTrainer, "dpo": PreferenceTrainer, "rm": RewardModelTrainer}[kind](cfg)
    run = SimpleNamespace(run_dir=run_dir, results={}, state=SimpleNamespace(step=0), write=print)
    if kind == "dpo":
        trainer.start(run)  # reference log-probs
    grads: list[torch.Tensor] = []
    step = trainer.optimizer.step

    def recording_step(*a, **k):
        grads.extend((p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                     for p in trainer.params)
        return step(*a, **k)

    trainer.optimizer.step = recording_step
    if kind == "sft":
        trainer.update(trainer.batch_rows(0))
    else:
        trainer.step(run)
    d = distributed.current()
    params = d.full_state_dict(trainer.model) if d is not None else trainer.model.state_dict()
    trainer.close()
    return grads, params


def _rank_other_kinds(rank: int, world: int, cfg_dir: str, pairs: str, out_path: str, strategy: str) -> None:
    from postrl.config import load_config

    results = {}
    for kind, opts in OTHER_KINDS.items():
        distributed.activate(strategy)
        extra = (f"preference.path={pairs}",) if kind in ("dpo", "rm") else ()
        cfg = load_config(Path(cfg_dir) / "config.yaml", [*extra, *opts])
        run_dir = Path(cfg_dir) / f"run-{strategy}-{kind}"
        run_dir.mkdir(exist_ok=True)
        results[f"{strategy}-{kind}"] = one_step(kind, cfg, run_dir)
    if rank == 0:
        torch.save(results, out_path)


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])  # fsdp: ~45 s more
def test_sft_dpo_rm_updates_on_two_ranks_equal_one_process(tiny_config, tmp_path, strategy):
    from postrl.config import save_config
    from tests.test_dpo import write_pairs

    pairs = write_pairs(tmp_path / "pairs.jsonl", 32, seed=5)
    save_config(tiny_config(), tmp_path / "config.yaml")
    expected = {}
    for kind, opts in OTHER_KINDS.items():
        extra = (f"preference.path={pairs}",) if kind in ("dpo", "rm") else ()
        (tmp_path / f"single-{kind}").mkdir()
        expected[kind] = one_step(kind, tiny_config(*extra, *opts), tmp_path / f"single-{kind}")
    run_ranks(_rank_other_kinds, tmp_path, str(tmp_path), str(pairs), str(tmp_path / "out.pt"), strategy)
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    for name, (g_grads, g_params) in got.items():
        e_grads, e_params = expected[name.split("-")[1]]
        assert e_grads and max(float(g.abs().max()) for g in e_grads) > 0, name
        assert _close(g_grads, e_grads), f"{name}: gradients differ from one process on the whole batch"
        for k in e_params:
            assert torch.allclose(g_params[k], e_params[k], atol=1e-5, rtol=1e-5), f"{name}: parameter {k}"


def _rank_bf16(rank: int, world: int, cfg_dir: str, batch_path: str, out_path: str) -> None:
    from postrl.config import load_config
    from postrl.trainer.rl import RLTrainer

    distributed.activate("fsdp", "bf16")
    trainer = RLTrainer(load_config(Path(cfg_dir) / "config.yaml",
                                    [*case_overrides("token_mean", "grpo"), "train.strategy=fsdp",
                                     "train.mixed_precision=bf16"]))
    batch = torch.load(batch_path, weights_only=False).select(trainer.layout.rows_of[rank])
    grads, params, _ = capture_update(trainer, batch)
    dtypes = {p.dtype for p in trainer.params}
    trainer.close()
    if rank == 0:
        torch.save((grads, params, dtypes), out_path)


def test_fsdp_bf16_mixed_precision_keeps_float32_weights_and_the_gradient_direction(tiny_config, tmp_path):
    from postrl.config import save_config
    from postrl.trainer.rl import RLTrainer

    batch = fixed_batch(tiny_config, tmp_path / "batch.pt")
    save_config(tiny_config(), tmp_path / "config.yaml")
    trainer = RLTrainer(tiny_config(*case_overrides("token_mean", "grpo")))
    e_grads, _, _ = capture_update(trainer, batch)
    trainer.close()
    run_ranks(_rank_bf16, tmp_path, str(tmp_path), str(tmp_path / "batch.pt"), str(tmp_path / "out.pt"))
    grads, params, dtypes = torch.load(tmp_path / "out.pt", weights_only=False)
    assert dtypes == {torch.float32} and all(v.dtype == torch.float32 for v in params.values())  # master weights
    a, b = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in e_grads])
    cosine = float(a @ b / (a.norm() * b.norm()))
    assert 0.99 < cosine < 1.0, cosine  # bfloat16 compute: the float32 gradient's direction, not its bits


def _rank_resume_full_as_fsdp(rank: int, world: int, cfg_dir: str, ckpt: str, out_path: str) -> None:
    from postrl.config import load_config
    from postrl.run.lifecycle import _restore
    from postrl.trainer.rl import RLTrainer

    distributed.activate("fsdp")
    trainer = RLTrainer(load_config(Path(cfg_dir) / "config.yaml", [*BASE, "train.strategy=fsdp"]), Path(ckpt))
    assert _restore(trainer, Path(ckpt), Path(cfg_dir) / "single").step == 1
    params, optim = distributed.current().full_state_dict(trainer.model), _full_optimizer_state(trainer)
    trainer.close()
    if rank == 0:
        torch.save((params, optim), out_path)


def test_checkpoint_of_one_process_resumes_with_two_fsdp_ranks(tiny_config, tmp_path):
    from postrl.config import save_config
    from postrl.run.checkpoint import latest_checkpoint
    from postrl.run.lifecycle import Run, RunState
    from postrl.trainer.rl import RLTrainer

    batch = fixed_batch(tiny_config, tmp_path / "batch.pt")
    save_config(tiny_config(), tmp_path / "config.yaml")
    trainer = RLTrainer(tiny_config(*BASE))
    trainer.update(batch, 0)
    Run(trainer.cfg, trainer, tmp_path / "single", RunState(step=1)).save()
    params, optim = trainer.model.state_dict(), _full_optimizer_state(trainer)
    trainer.close()
    ckpt = latest_checkpoint(tmp_path / "single" / "checkpoints")
    run_ranks(_rank_resume_full_as_fsdp, tmp_path, str(tmp_path), str(ckpt), str(tmp_path / "out.pt"))
    got_params, got_optim = torch.load(tmp_path / "out.pt", weights_only=False)
    assert all(torch.equal(got_params[k], v) for k, v in params.items())
    assert got_optim.keys() == optim.keys() and all(torch.equal(got_optim[k], v) for k, v in optim.items())
