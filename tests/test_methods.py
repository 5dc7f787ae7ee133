"""Every method of the library runs through the trainer, and its trainer-side pieces do what they say."""

import math

import re

import pytest
import yaml
from conftest import read_metrics

from postrl.config import load_config
from postrl.trainer import train

FAST = ("run.threads=1", "rollout.n=4", "rollout.max_new_tokens=2", "train.prompts_per_step=4", "train.steps=3")


@pytest.mark.parametrize("method", [
    ("algo.advantage=grpo", "algo.policy_loss=ppo_clip", "algo.loss_agg=token_mean"),
    ("algo.advantage=dr_grpo", "algo.loss_agg=seq_mean_token_sum_norm"),
    ("algo.advantage=rloo", "algo.loss_agg=seq_mean_token_mean"),
    ("algo.advantage=reinforce_pp", "algo.kl_coef=0.01", "algo.kl_in_reward=true"),
    ("algo.advantage=reinforce_pp_baseline", "algo.kl_coef=0.01", "algo.kl_in_reward=true"),
    ("algo.advantage=remax",),
    ("algo.advantage=bnpo",),
    ("algo.policy_loss=gspo", "algo.loss_agg=seq_mean_token_mean", "algo.clip_eps_low=3e-4", "algo.clip_eps_high=4e-4"),
    ("algo.policy_loss=cispo", "algo.clip_eps_low=1.0", "algo.clip_eps_high=4.0"),
    ("algo.policy_loss=reinforce", "algo.loss_agg=seq_mean_token_sum"),
    ("algo.dual_clip_c=3.0", "algo.tis_mode=clamp"),
    # issue 17 (micro batches of 8 in a rollout batch of 16: the entropy-control losses select per micro batch)
    ("algo.policy_loss=clip_cov", "algo.clip_cov_ratio=0.5", "algo.clip_cov_lb=-10", "algo.dual_clip_c=3.0"),
    ("algo.policy_loss=kl_cov", "algo.kl_cov_ratio=0.5"),
    ("algo.policy_loss=gmpo", "algo.loss_agg=seq_mean_token_mean", "algo.clip_eps_low=0.4", "algo.clip_eps_high=0.4"),
    ("algo.policy_loss=sapo", "algo.loss_agg=seq_mean_token_mean"),
    ("algo.policy_loss=dppo", "algo.dppo_divergence=binary_kl", "algo.dppo_delta_low=0.05",
     "algo.dppo_delta_high=0.05"),
    ("algo.policy_loss=topr", "algo.advantage=dr_grpo", "algo.loss_agg=seq_mean_token_sum"),
    ("algo.advantage=passk", "algo.passk_k=2"),
    ("algo.advantage=gfpo", "algo.gfpo_k=2", "algo.gfpo_metric=reward_per_token", "algo.adv_std_unbiased=true"),
    ("algo.advantage=opmd", "algo.opmd_baseline=logavgexp", "algo.policy_loss=reinforce"),
    ("algo.advantage=asymre", "algo.policy_loss=reinforce"),
    ("algo.advantage=w_reinforce", "algo.policy_loss=reinforce"),
], ids=lambda m: m[0].split("=")[1] if "advantage" in m[0] or "policy_loss" in m[0] else "dual_clip_tis")
def test_every_method_trains(tiny_config, method):
    run_dir, results = train(tiny_config(*FAST, *method))
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3] and results["nonfinite_steps"] == 0
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_dynamic_sampling_keeps_only_informative_groups(tiny_config):
    cfg = tiny_config(*FAST, "algo.dynamic_sampling=true", "algo.max_sampling_tries=6", "rollout.max_new_tokens=1",
                      "train.steps=4")
    run_dir, _ = train(cfg)
    rows = read_metrics(run_dir)
    # the random tiny model is mostly wrong: many groups are all-zero and get dropped and re-sampled
    assert sum(r["groups_dropped"] for r in rows) > 0 and max(r["sampling_tries"] for r in rows) > 1
    for r in rows:
        if r["groups_dropped"] + 4 <= 4 * r["sampling_tries"]:  # enough informative groups were found
            assert r["rows_computed_frac"] == 1.0  # no kept group has all-equal rewards


def test_kl_in_reward_and_adaptive_coefficient(tiny_config):
    cfg = tiny_config(*FAST, "algo.kl_coef=0.05", "algo.kl_target=1e-6", "algo.kl_horizon=10", "train.steps=4",
                      "train.lr=3e-3")
    run_dir, _ = train(cfg)
    rows = read_metrics(run_dir)
    coefs = [r["kl_coef"] for r in rows]
    assert coefs[0] == pytest.approx(0.05)
    # the controller raises the coefficient after a step whose KL is above the tiny target and lowers it after one
    # below (at step 1 the policy is the reference: KL 0); the policy moves, so the KL exceeds the target at least once
    raised = 0
    for now, nxt in zip(rows, rows[1:]):
        if now["kl_ref"] > 1e-6:
            assert nxt["kl_coef"] > now["kl_coef"]
            raised += 1
        else:
            assert nxt["kl_coef"] < now["kl_coef"]
    assert raised >= 1
    assert all(r["kl_ref"] >= 0 for r in rows)


def test_truncated_importance_sampling_is_one_on_policy(tiny_config):
    run_dir, _ = train(tiny_config(*FAST, "algo.tis_mode=mask", "algo.tis_cap=2.0"))
    for r in read_metrics(run_dir):
        # old log-probs recomputed by the trainer equal the sampler's: ratio 1, nothing masked
        assert r["tis/ratio_mean"] == pytest.approx(1.0, abs=1e-4) and r["tis/masked_frac"] == 0.0


def test_overlong_shaping_penalises_truncated_completions(tiny_config):
    # a random model never emits EOS within 3 tokens: every completion is at the limit -> penalty -0.5
    run_dir, _ = train(tiny_config(*FAST, "rollout.max_new_tokens=3", "algo.overlong_buffer=2",
                                   "algo.overlong_penalty=0.5", "algo.overlong_filter=true"))
    rows = read_metrics(run_dir)
    for r in rows:
        assert -0.5 <= r["reward/overlong"] <= 0
        assert r["reward_mean"] == pytest.approx(r["reward/task"] + r["reward/overlong"], abs=1e-6)
    assert min(r["reward/overlong"] for r in rows) < 0


def test_kl_in_reward_without_a_coefficient_is_refused_up_front(tiny_config):
    from postrl.config import ConfigError

    with pytest.raises(ConfigError, match="kl_in_reward=true needs algo.kl_coef > 0"):
        train(tiny_config("algo.kl_in_reward=true"))


def test_every_recipe_loads_and_names_its_paper():
    from pathlib import Path

    from postrl.config import ConfigError

    recipes = sorted((Path(__file__).parent.parent / "postrl" / "recipes").glob("*.yaml"))
    assert len(recipes) >= 8
    for path in recipes:
        text = path.read_text()
        if path.stem in PENDING_RECIPES:  # refused, by name, until the trainer side exists (issue 17)
            with pytest.raises(ConfigError, match="not supported by the RL trainer yet"):
                load_config(path)
            continue
        cfg = load_config(path)
        assert re.search(r"arXiv:\d{4}\.\d{4,5}|et al\. 20\d\d|\b\w+ 20\d\d, \"", text) or path.stem == "quickstart", \
            f"{path.name} must cite its paper"
        assert yaml.safe_load(text)  # parses
        assert cfg.algo.advantage and cfg.algo.policy_loss


@pytest.mark.parametrize("combo", [
    ("algo.policy_loss=gspo", "algo.loss_agg=token_mean"),
    ("algo.policy_loss=cispo", "algo.dual_clip_c=3"),
    ("algo.kl_target=0.01",),
    ("algo.advantage=bnpo", "algo.overlong_buffer=1", "rollout.max_new_tokens=2"),
    ("algo.advantage=remax", "algo.dynamic_sampling=true"),
])
def test_incompatible_pieces_fail_at_start_up(tiny_config, combo):
    from postrl.config import ConfigError

    with pytest.raises(ConfigError) as ei:
        train(tiny_config(*combo))
    assert combo[0].split("=")[0] in str(ei.value) or "algo." in str(ei.value)


RECIPES_DIR = __import__("pathlib").Path(__file__).parent.parent / "postrl" / "recipes"
# Recipes whose method needs a trainer hook that is not wired yet (postrl.config.rl.PENDING_TRAINER_HOOKS):
# their config is refused up front. When the trainer passes the per-token entropy to the policy loss and the
# refusal is removed, this set is emptied and the recipe's learning test below must pass.
PENDING_RECIPES: set[str] = set()  # issue 17: every trainer hook a recipe needs is wired
# Recipes whose settings do not take the tiny toy task to 0.9 (measured), kept visible as strict xfails rather
# than tuned away. Empty since 2026-12-03: W-REINFORCE, the last one, learns with a KL to the initial model
# (see its toy settings below).
SLOW_ON_TOY: dict[str, str] = {}
# RL recipes (postrl train); those with a preference/sft/stages section belong to postrl dpo / rm / sft / pipeline
METHOD_RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if p.stem != "quickstart"
                        and p.stem != "quickstart_lora"  # the quickstart's algo with LoRA: tests/test_lora.py
                        and not p.stem.startswith(("curriculum_", "guidance_"))  # data recipes: test_curricula_training
                        # agent recipes (an env section) train on episodes: tests/test_agent_recipes.py
                        and not {"preference", "sft", "stages", "env"} & set(yaml.safe_load(p.read_text())))


def _recipe_method_overrides(name: str) -> list[str]:
    """The recipe's algo and critic settings as dotted overrides (its model and data are replaced by the toy task)."""
    if name == "ppo_shared_backbone":  # the PPO recipe with the value head on the policy (critic.shared_backbone)
        return _recipe_method_overrides("ppo") + ["critic.shared_backbone=true"]
    data = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())
    out = []
    for section in ("algo", "critic"):
        for key, value in (data.get(section) or {}).items():
            out.append(f"{section}.{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    return out


def _toy_param(name: str):
    if name in PENDING_RECIPES:
        from postrl.config import ConfigError

        return pytest.param(name, marks=pytest.mark.xfail(raises=ConfigError, strict=True,
                                                          reason="needs a trainer hook (issue 17)"))
    if name in SLOW_ON_TOY:
        return pytest.param(name, marks=pytest.mark.xfail(raises=AssertionError, strict=True,
                                                          reason=SLOW_ON_TOY[name]))
    return name


@pytest.mark.parametrize("name", [_toy_param(n) for n in METHOD_RECIPES] + ["ppo_shared_backbone"])
def test_every_recipe_learns_the_toy_task(tiny_config, name):
    """Each method's recipe, on the tiny model and the copy task of the core tests: chance -> >= 0.9."""
    method = _recipe_method_overrides(name)
    # Groups of 16: with groups of 8 (until 2026-12-02) seed 0 of the GRPO-family trajectory collapsed one digit
    # onto a wrong answer with probability ~1 once the shared-prefix update changed the float rounding (0.820 after
    # 150 steps; seeds 0-4 of cispo: 0.820, 0.926, 0.993, 0.992, 0.992), and an all-wrong group teaches GRPO
    # nothing. With 16: 0.995 for seeds 0-4 alike. The per-recipe notes below were measured with groups of 8.
    toy = ["rollout.n=16", "rollout.max_new_tokens=1", "train.prompts_per_step=16", "train.mini_batch_size=0",
           "train.micro_batch_size=128", "train.lr=2e-3", "critic.lr=2e-3", "critic.warmup_steps=0",
           "train.steps=150", "run.seed=0", "run.threads=2", "algo.overlong_buffer=0"]
    if name == "remax":  # unnormalised advantages r - r_greedy in {-1, 0, 1}: smaller steps, more of them
        toy += ["train.steps=300"]  # seed 0: 0.907 at 250 steps with the per-tensor AdamW loop, 0.873 with the
        # fused kernel (rounding only); 0.914 at 300
    if name == "reinforce_pp":  # batch-normalised advantages, no per-prompt baseline: noisier, ~0.9 at step 150
        toy += ["train.steps=200"]  # seeds 0/1/2: last-10 mean reward 0.930 / 0.918 / 0.998
    if name == "gfpo":  # sample 32, train on the recipe's gfpo_k = 8 of each group (GFPO's regime: sample
        toy += ["rollout.n=32"]  # more, keep k): 0.989 at 150 steps; sampling 16 and keeping 8: 0.908 / 0.914 at
        # 150 / 250 steps
    if name == "passk":  # pass@4 gives a group with < 4 wrong of 8 advantage 0, so pass@1 stalls at ~0.89
        toy += ["algo.passk_k=2"]  # (k=4: 0.876 at 150, 0.884 at 250 steps); k=2: 0.973 at 150
    if name == "top_entropy":  # one token per completion: rho = 0.2 trains on a fifth of the samples (measured
        toy += ["algo.entropy_top_ratio=0.5", "train.steps=200"]  # through a shim that passes the entropy: 0.188
        # at 150 steps, 0.692 at 500); rho = 0.5: 0.942 over steps 125-150, 0.995 at 250
    if name == "asymre":  # baseline 0.1 below the mean: an all-wrong group pushes its wrong samples up (+0.1), a
        toy += ["algo.dynamic_sampling=true"]  # few digits get stuck (0.818 / 0.816, seeds 0/1); dropping
        # all-equal groups (DAPO's dynamic sampling) removes that push: 0.912
    if name == "w_reinforce":  # the paper's actor (clipped ratio, 4 updates per rollout batch: the toy batch is
        # large enough for them, the recipe's 4-prompt CPU batch is not) plus a KL of 0.03 to the initial model.
        # NSR refines the model's prior (the paper's gradient analysis); this random tiny model has a flat one, and
        # a prompt with p_right ~ 0 gets expected gradient (1 + lambda) p_right (e_right - p) ~ 0, so its
        # probability drifts onto one wrong digit and stays there. The KL pulls it back towards the flat start,
        # where the right digit is sampled again. Seeds 0-4: 0.971 / 0.972 / 0.967 / 0.978 / 0.973 at 400 steps;
        # without the KL 0.461 (seed 0); with it and one update per step (lr 2e-3, 600 steps) seed 2 stalls at
        # 0.570; the recipe before 2026-12-03 (ratio-free reinforce loss, one update, no KL) 0.087 at 600.
        toy += ["train.mini_batch_size=64", "train.micro_batch_size=64", "train.lr=1e-3", "train.steps=400",
                "algo.kl_coef=0.03"]
    run_dir, _ = train(tiny_config(*method, *toy))
    rows = read_metrics(run_dir)
    first = sum(r["reward_mean"] for r in rows[:5]) / 5
    last = sum(r["reward_mean"] for r in rows[-10:]) / 10
    print(f"{name}: mean reward first 5 steps {first:.3f}, last 10 steps {last:.3f}, {len(rows)} steps")
    assert first < 0.15, f"{name}: reward at the start {first:.3f} is not chance level"
    assert last >= 0.9, f"{name}: mean reward over the last 10 steps {last:.3f} < 0.9"
