"""Samplers, mixtures and guidance inside the RL trainer (issue 16): the default sampler draws exactly today's
prompts, every sampler and guidance method resumes exactly (3 + 3 steps == 6 steps), the per-task and
zero-variance metrics are logged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from postrl.config import load_config
from postrl.data.sampler import PromptSampler
from postrl.run.checkpoint import latest_checkpoint
from postrl.trainer import train

ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
MIXTURE = ("data.mixture=[{name: c1, source: toy, task: copy, task_kwargs: {length: 1, alphabet: " + ALPHABET
           + ", partial_credit: false}, train_size: 26, eval_size: 10}, {name: c2, source: toy, task: copy, "
           "task_kwargs: {length: 2, alphabet: " + ALPHABET + ", partial_credit: false}, train_size: 60, "
           "eval_size: 10, weight: 2}]")


def toy(tmp_path: Path, model: Path, *overrides: str):
    base = [f"model.name_or_path={model}", MIXTURE, "data.answer_extraction=raw", "rollout.n=4",
            "rollout.max_new_tokens=3", "train.prompts_per_step=4", "train.micro_batch_size=16", "train.lr=3e-3",
            "eval.before=false", "eval.after=false", f"run.output_dir={tmp_path / 'runs'}", "run.progress=false",
            "run.threads=1"]
    return load_config(None, base + list(overrides))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run_dir / "checkpoints") / "model.safetensors"))


class PlainSampler(PromptSampler):
    """Today's sampler with the interface the trainer now calls."""

    screen = 0

    def update(self, *args):
        pass

    def metrics(self):
        return {}


def test_default_sampler_gives_todays_prompts_and_rewards(tiny_config, monkeypatch):
    run_new, _ = train(tiny_config("train.steps=4", "run.name=new", "rollout.temperature=1.0"))
    import postrl.trainer.rl as rl

    monkeypatch.setattr(rl, "build_sampler", lambda name, kw, source, seed, n: PlainSampler(source.train, seed))
    run_old, _ = train(tiny_config("train.steps=4", "run.name=old", "rollout.temperature=1.0"))
    new, old = metrics(run_new), metrics(run_old)
    assert [r["reward_mean"] for r in new] == [r["reward_mean"] for r in old]
    assert [r["accuracy"] for r in new] == [r["accuracy"] for r in old]
    w_new, w_old = weights(run_new), weights(run_old)
    assert all(torch.equal(w_new[k], w_old[k]) for k in w_new)
    for r in new:  # zero-variance accounting on every step
        assert 0 <= r["zero_var/group_frac"] <= 1 and r["rollouts_generated"] == 16
        assert r["zero_var/rollouts"] == 4 * r["zero_var/group_frac"] * 4


CASES = {
    "uniform": (),
    "difficulty_filter": ("data.sampler.name=difficulty_filter", "data.sampler.kwargs.explore=0.2"),
    "learnability": ("data.sampler.name=learnability",),
    "speed": ("data.sampler.name=speed", "data.sampler.kwargs.screen=2", "data.sampler.kwargs.max_tries=3"),
    "dump": ("data.sampler.name=dump", "data.sampler.kwargs.window=16"),
    "mopps": ("data.sampler.name=mopps", "data.sampler.kwargs.decay=0.8"),
    "prefix_hint": ("data.guidance.name=prefix_hint", "data.guidance.kwargs.field=answer",
                    "data.guidance.kwargs.start=1.0", "data.guidance.kwargs.decay_steps=6"),
    "guide": ("data.guidance.name=guide", "data.guidance.kwargs.field=answer", "data.guidance.kwargs.share=1.0"),
    "luffy": ("data.guidance.name=luffy", "data.guidance.kwargs.field=answer"),
    # traces sampled from a teacher model (here the starting model itself), 2 candidates per prompt
    "luffy_teacher": ("data.guidance.name=luffy", "data.guidance.kwargs.teacher={tiny}",
                      "data.guidance.kwargs.teacher_samples=2"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_sampler_and_guidance_method_resumes_exactly(case, tiny_model_dir, tmp_path):
    opts = tuple(o.format(tiny=tiny_model_dir) for o in CASES[case])
    straight, _ = train(toy(tmp_path, tiny_model_dir, *opts, "train.steps=6", "train.save_every=0",
                            "run.name=straight"))
    split, _ = train(toy(tmp_path, tiny_model_dir, *opts, "train.steps=3", "run.name=split"))
    split, _ = train(toy(tmp_path, tiny_model_dir, *opts, "train.steps=6", "run.name=split"), resume=split)
    a, b = metrics(straight), metrics(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in ra:
            if key.startswith(("reward", "accuracy", "zero_var", "sampler/", "guidance/", "groups", "rollouts",
                               "gen_tokens_total", "loss")):
                assert ra[key] == pytest.approx(rb[key], abs=1e-6), (case, ra["step"], key)
        assert {k for k in ra if not k.endswith("_s") and "per_s" not in k} == \
               {k for k in rb if not k.endswith("_s") and "per_s" not in k}
    wa, wb = weights(straight), weights(split)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0) for k in wa), case
    assert any(r["groups/task/c1"] > 0 for r in a) or case == "speed"  # per-task metrics of the mixture
    if case == "luffy":
        assert all(r["guidance/teacher_correct_frac"] == 1.0 for r in a)
    if case in ("difficulty_filter", "speed", "mopps"):
        assert "sampler/skipped" in a[0]


def test_rg_curriculum_resumes_exactly_and_logs_its_level(tiny_model_dir, tmp_path):
    opts = (f"model.name_or_path={tiny_model_dir}", "data.source=reasoning_gym", "data.task=basic_arithmetic",
            "data.train_size=16", "data.eval_size=4", "data.answer_extraction=raw", "rollout.n=4",
            "rollout.max_new_tokens=3", "train.prompts_per_step=4", "train.micro_batch_size=16",
            "data.sampler.name=rg_curriculum", "data.sampler.kwargs.window=8", "data.sampler.kwargs.success_threshold=0.0",
            "data.sampler.kwargs.pool=32", "eval.before=false", "eval.after=false",
            f"run.output_dir={tmp_path / 'runs'}", "run.progress=false", "run.threads=1")
    straight, _ = train(load_config(None, [*opts, "train.steps=6", "train.save_every=0", "run.name=a"]))
    split, _ = train(load_config(None, [*opts, "train.steps=3", "run.name=b"]))
    split, _ = train(load_config(None, [*opts, "train.steps=6", "run.name=b"]), resume=split)
    a, b = metrics(straight), metrics(split)
    levels = [r["sampler/level/basic_arithmetic"] for r in a]
    # 16 completions a step fill the window of 8: every step moves up, to num_terms' last level (4)
    assert levels == [r["sampler/level/basic_arithmetic"] for r in b] and levels == [1, 2, 3, 4, 4, 4]
    assert [r["reward_mean"] for r in a] == [r["reward_mean"] for r in b]
    wa, wb = weights(straight), weights(split)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0) for k in wa)


def test_postrl_eval_of_a_mixture_run_reports_every_task(tiny_model_dir, tmp_path, capsys):
    from postrl.cli import main
    from postrl.data import Sample
    from postrl.eval.runner import task_rows

    assert task_rows([Sample("q", "a", {"task_name": "x"}, uid="1")] * 2) == {}  # one task: no split
    assert task_rows([Sample("q", "a", {}, uid="1"), Sample("q", "a", {"task_name": "x"}, uid="2")]) == {}
    run_dir, _ = train(toy(tmp_path, tiny_model_dir, "train.steps=1", "run.name=evmix"))
    capsys.readouterr()
    assert main(["eval", "--model", str(run_dir), "--n", "2", "--k", "1,2", "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "task c1: 10 problems" in out and "task c2: 10 problems" in out
    model = json.loads((run_dir / "eval" / "eval.json").read_text())["models"][0]
    assert set(model["tasks"]) == {"c1", "c2"} and model["tasks"]["c1"]["num_problems"] == 10
    for key in ("1", "2"):  # equal task sizes: the overall number is the mean of the two tasks'
        per_task = [model["tasks"][t]["pass_at_k"][key]["value"] for t in ("c1", "c2")]
        assert model["pass_at_k"][key]["value"] == pytest.approx(sum(per_task) / 2)
    assert model["greedy_accuracy"]["value"] == pytest.approx(
        (model["tasks"]["c1"]["greedy_accuracy"]["value"] + model["tasks"]["c2"]["greedy_accuracy"]["value"]) / 2)


def test_mixture_evaluation_reports_every_task(tiny_model_dir, tmp_path):
    run_dir, results = train(toy(tmp_path, tiny_model_dir, "train.steps=2", "eval.after=true", "eval.every=1",
                                 "run.name=ev"))
    ev = results["eval_after"]
    assert set(ev["tasks"]) == {"c1", "c2"} and ev["n"] == 20
    assert ev["accuracy"] == pytest.approx((ev["tasks"]["c1"]["accuracy"] * 10 + ev["tasks"]["c2"]["accuracy"] * 10) / 20)
    last = metrics(run_dir)[0]  # step 1, with the periodic evaluation
    assert "eval/accuracy/c1" in last and "eval/accuracy/c2" in last and "reward/task/c2" in last


RECIPES = Path(__file__).resolve().parent.parent / "postrl" / "recipes"
DATA_RECIPES = sorted(p.stem for p in RECIPES.glob("*.yaml") if p.stem.startswith(("curriculum_", "guidance_"))
                      and p.stem != "curriculum_rg_curriculum")  # rg_curriculum needs a reasoning-gym task


# Samplers that keep drawing the prompts the model does not solve yet train on harder prompts by design, so their
# *training* reward can stay below 0.9 (strict xfails here). With groups of 8 difficulty_filter and learnability
# stayed at 0.830 / 0.833 over the last 10 of 150 steps; with groups of 16 they reach 0.994 / 0.936 (seed 0).
LOWER_TRAINING_REWARD: set[str] = set()


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(
    raises=AssertionError, strict=True, reason="samples unsolved prompts by design: training reward ~0.83"))
    if n in LOWER_TRAINING_REWARD else n for n in DATA_RECIPES])
def test_every_curriculum_recipe_learns_the_toy_task(tiny_config, name):
    """Each sampler's and guidance method's recipe (its data.sampler / data.guidance and algo section) on the tiny
    model and the one-token copy task of the core tests: chance -> >= 0.9 mean reward."""
    import yaml

    recipe = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    over = []
    for key in ("sampler", "guidance"):
        spec = dict(recipe["data"].get(key) or {})
        if spec:
            over.append(f"data.{key}.name={spec.pop('name')}")
            over += [f"data.{key}.kwargs.{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                     for k, v in spec.items()]
    over += [f"algo.{k}={v}" for k, v in (recipe.get("algo") or {}).items()]
    # groups of 16, as in tests/test_methods.py (groups of 8 collapsed a digit of seed 0's GRPO trajectory)
    run_dir, _ = train(tiny_config(*over, "rollout.n=16", "rollout.max_new_tokens=1", "train.prompts_per_step=16",
                                   "train.micro_batch_size=128", "train.lr=2e-3", "train.steps=150", "run.seed=0",
                                   "run.threads=2"))
    rows = metrics(run_dir)
    first = sum(r["reward_mean"] for r in rows[:5]) / 5
    last = sum(r["reward_mean"] for r in rows[-10:]) / 10
    print(f"{name}: mean reward first 5 steps {first:.3f}, last 10 steps {last:.3f}")
    assert last >= 0.9, f"{name}: mean reward over the last 10 steps {last:.3f} < 0.9"
    assert all("zero_var/group_frac" in r for r in rows)
