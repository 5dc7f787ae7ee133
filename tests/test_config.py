"""Tests for postrl.config: loading, overrides, strict typing, validation, round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from postrl.config import (
    MOVED_KEYS,
    Config,
    ConfigError,
    PreferenceConfig,
    Problems,
    RewardSpec,
    StageSpec,
    TrainConfig,
    check_command,
    from_dict,
    load_config,
    save_config,
    to_dict,
    validate,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_load_and_validate() -> None:
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert cfg.rewards == [RewardSpec()]
    assert cfg.train.adam_betas == [0.9, 0.999]
    assert cfg.rollout_batch_size == 64
    assert cfg.resolved_mini_batch_size == 64
    assert cfg.resolved_eval_max_new_tokens == cfg.rollout.max_new_tokens
    assert cfg.resolved_data_seed == cfg.run.seed
    validate(cfg)


def test_defaults_are_not_shared() -> None:
    a, b = Config(), Config()
    a.data.task_kwargs["x"] = 1
    a.rewards.append(RewardSpec(name="other"))
    assert b.data.task_kwargs == {} and len(b.rewards) == 1


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, """
train:
  lr: 1e-5          # YAML 1.1 reads this as a string; accepted for float fields
  steps: 5
rollout:
  n: 4
run:
  name: mine
eval:               # empty section = defaults
""")
    cfg = load_config(path, ["train.lr=3e-6", "rollout.top_k=50", "run.progress=false",
                             "train.adam_betas=[0.9, 0.95]", "run.name=2024"])
    assert cfg.train.lr == pytest.approx(3e-6) and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 5
    assert cfg.rollout.n == 4 and cfg.rollout.top_k == 50
    assert cfg.run.progress is False
    assert cfg.train.adam_betas == [0.9, 0.95]
    assert cfg.run.name == "2024"  # numeric text kept as a string for str fields
    assert cfg.eval == Config().eval
    assert load_config(path).train.lr == pytest.approx(1e-5)


def test_int_accepted_for_float() -> None:
    cfg = load_config(None, ["train.grad_clip=2"])
    assert cfg.train.grad_clip == 2.0 and isinstance(cfg.train.grad_clip, float)


def test_nested_dict_override() -> None:
    cfg = load_config(None, ["data.task_kwargs.num_terms=2", "data.task_kwargs.ops.plus=true"])
    assert cfg.data.task_kwargs == {"num_terms": 2, "ops": {"plus": True}}


def test_list_of_dataclass_override(tmp_path: Path) -> None:
    cfg = load_config(None, ["rewards.0.weight=2", "rewards.1.name=format", "rewards.1.weight=0.5"])
    assert cfg.rewards == [RewardSpec(name="task", weight=2.0), RewardSpec(name="format", weight=0.5)]
    path = write(tmp_path, "rewards:\n  - {name: task}\n  - {name: 'mod:fn', kwargs: {k: 1}}\n")
    cfg = load_config(path, ["rewards.1.kwargs.k=3"])
    assert cfg.rewards[1] == RewardSpec(name="mod:fn", weight=1.0, kwargs={"k": 3})
    with pytest.raises(ConfigError, match="not a valid index"):
        load_config(None, ["rewards.5.weight=1"])


def test_unknown_key_in_yaml_suggests(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, "train:\n  lrr: 0.1\n"))
    msg = str(exc.value)
    assert "'train.lrr'" in msg and "Did you mean 'train.lr'" in msg and "prompts_per_step" in msg


def test_unknown_key_in_override_suggests() -> None:
    with pytest.raises(ConfigError, match=r"Did you mean 'train\.lr'"):
        load_config(None, ["train.lrr=1e-5"])
    with pytest.raises(ConfigError, match=r"Did you mean 'rollout\.n'"):
        load_config(None, ["train.n=4"])  # right name, wrong section
    with pytest.raises(ConfigError, match=r"Did you mean 'rewards\.0\.weight'"):
        load_config(None, ["rewards.0.wieght=2"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])


def test_unknown_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, "trian:\n  lr: 0.1\n"))
    assert "'trian'" in str(exc.value) and "Did you mean 'train'" in str(exc.value)
    with pytest.raises(ConfigError, match="Did you mean 'train'"):
        load_config(None, ["trian.lr=0.1"])


@pytest.mark.parametrize(
    "yaml_text, key, expected",
    [
        ('train:\n  steps: "abc"\n', "train.steps", "int"),
        ("run:\n  progress: 3\n", "run.progress", "bool"),
        ("train:\n  steps: true\n", "train.steps", "int"),  # bool is not an int
        ("train:\n  lr: true\n", "train.lr", "float"),
        ("train:\n  lr: fast\n", "train.lr", "float"),
        ("model:\n  revision: 3\n", "model.revision", "str | None"),
        ("data:\n  task_kwargs: [1, 2]\n", "data.task_kwargs", "dict[str, Any]"),
        ("train:\n  adam_betas: [0.9, x]\n", "train.adam_betas.1", "float"),
        ("rewards:\n  name: task\n", "rewards", "list[RewardSpec]"),
        ("rewards:\n  - {weight: heavy}\n", "rewards.0.weight", "float"),
        ("train: 5\n", "train", "TrainConfig"),
    ],
)
def test_wrong_type(tmp_path: Path, yaml_text: str, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, yaml_text))
    msg = str(exc.value)
    assert f"'{key}'" in msg and f"expects {expected}" in msg, msg


def test_wrong_type_in_override_and_toplevel(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'train\.steps' expects int.*'abc'"):
        load_config(None, ["train.steps=abc"])
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_from_dict_direct() -> None:
    train = from_dict(TrainConfig, {"lr": 1, "steps": 3}, "train")
    assert train == TrainConfig(lr=1.0, steps=3)
    with pytest.raises(ConfigError, match=r"'train\.stepz'"):
        from_dict(TrainConfig, {"stepz": 3}, "train")


def test_batch_divisibility_errors() -> None:
    # rollout batch 8 x 8 = 64, mini 24 does not divide it
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.mini_batch_size=24"])
    msg = str(exc.value)
    assert "train.mini_batch_size=24" in msg and "64" in msg and "16, 32, 64" in msg
    # mini 16, micro 6
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.mini_batch_size=16", "train.micro_batch_size=6"])
    msg = str(exc.value)
    assert "train.micro_batch_size=6" in msg and "16" in msg and "1, 2, 4, 8, 16" in msg
    # mini = whole rollout batch (2 x 2 = 4) and default micro 8
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.prompts_per_step=2", "rollout.n=2"])
    assert "micro_batch_size=8" in str(exc.value) and "1, 2, 4" in str(exc.value)
    cfg = load_config(None, ["train.prompts_per_step=2", "rollout.n=2", "train.micro_batch_size=2"])
    assert cfg.rollout_batch_size == 4 and cfg.resolved_mini_batch_size == 4


def test_group_size_at_least_two() -> None:
    with pytest.raises(ConfigError, match="at least 2 completions per prompt"):
        load_config(None, ["rollout.n=1"])


def test_jsonl_requires_path() -> None:
    with pytest.raises(ConfigError, match="data.path"):
        load_config(None, ["data.source=jsonl"])
    assert load_config(None, ["data.source=jsonl", "data.path=train.jsonl"]).data.path == "train.jsonl"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.dtype=fp16", "model.dtype"),
        ("model.device=gpu", "model.device"),
        ("data.source=hf", "data.source"),
        ("data.answer_extraction=box", "Did you mean 'boxed'"),
        ("data.prompt_template=Solve it", "{question}"),
        ("rollout.temperature=0", "rollout.temperature"),
        ("rollout.top_p=1.5", "rollout.top_p"),
        ("algo.clip_eps_low=-0.1", "algo.clip_eps_low"),
        ("train.lr=0", "train.lr"),
        ("train.lr=nan", "train.lr"),
        ("train.adam_betas=[0.9]", "exactly 2"),
        ("train.lr_schedule=step", "constant, linear, cosine"),
        ("rewards=[]", "at least one reward"),
    ],
)
def test_validation_errors(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert needle in str(exc.value)


def test_validation_accepts_valid_choices() -> None:
    cfg = load_config(None, ["model.device=cuda:1", "model.dtype=bfloat16", "train.lr_schedule=cosine",
                             "data.answer_extraction=last_number", "rollout.top_p=0.9"])
    assert cfg.model.device == "cuda:1"


def test_registry_names_validated_but_not_reward_names() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["algo.advantage=my_adv", "algo.policy_loss=x", "preference.loss=orp"])
    msg = str(exc.value)
    assert "Unknown advantage estimator 'my_adv' for algo.advantage." in msg
    assert "Unknown policy loss 'x' for algo.policy_loss." in msg
    assert "Unknown preference loss 'orp' for preference.loss. Did you mean 'orpo'?" in msg
    # reward names are resolved by postrl.rewards when a trainer starts, not by the config
    assert load_config(None, ["rewards.0.name=mod:fn"]).rewards[0].name == "mod:fn"


def test_validation_collects_all_errors() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["rollout.n=1", "train.lr=-1"])
    assert "rollout.n" in str(exc.value) and "train.lr" in str(exc.value)


def test_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, [
        "train.lr=1e-5", "rollout.n=4", "data.task_kwargs.num_terms=2", "data.system_prompt=Be brief.",
        "rewards.1.name=format", "rewards.1.weight=0.25", "model.revision=abc123", "run.seed=7",
    ])
    path = save_config(cfg, tmp_path / "sub" / "saved.yaml")
    again = load_config(path)
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)
    assert load_config(save_config(Config(), tmp_path / "d.yaml")) == Config()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


# --------------------------------------------------------------------------------------------------
# each section validates itself
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "section, change, key",
    [
        ("model", {"dtype": "fp16"}, "model.dtype"),
        ("data", {"source": "hf"}, "data.source"),
        ("rollout", {"temperature": 0.0}, "rollout.temperature"),
        ("scoring", {"eps": 0.0}, "scoring.eps"),
        ("algo", {"gamma": 2.0}, "algo.gamma"),
        ("critic", {"lr": 0.0}, "critic.lr"),
        ("train", {"epochs": 0}, "train.epochs"),
        ("eval", {"batch_size": 0}, "eval.batch_size"),
        ("run", {"seed": -1}, "run.seed"),
        ("preference", {"beta": 0.0}, "preference.beta"),
        ("sft", {"epochs": 0}, "sft.epochs"),
    ],
)
def test_rule_fires_from_its_own_section(section: str, change: dict, key: str) -> None:
    cfg = Config()
    setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **change))
    for f in dataclasses.fields(Config):  # only the changed section reports a problem
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            problems = Problems()
            value.validate(problems, cfg)
            if f.name == section:
                assert len(problems.messages) == 1 and problems.messages[0].startswith(f"{key}="), problems.messages
            else:
                assert problems.messages == [], (f.name, problems.messages)
    with pytest.raises(ConfigError, match=f"Invalid config:\n  - {key}="):
        validate(cfg)


def test_list_entries_validate_themselves() -> None:
    problems = Problems()
    RewardSpec(weight=float("inf")).validate(problems, "rewards.3")
    StageSpec(kind="ppo").validate(problems, "stages.1")
    assert problems.messages[0].startswith("rewards.3.weight=inf: must be finite")
    assert problems.messages[1].startswith("stages.1.kind='ppo' is not valid")
    assert len(problems.messages) == 2


# --------------------------------------------------------------------------------------------------
# keys that moved: algo.beta & co. are preference.* now
# --------------------------------------------------------------------------------------------------


def test_preference_loss_keys_live_in_preference() -> None:
    cfg = load_config({"preference": {"loss": "cdpo", "beta": 0.2, "label_smoothing": 0.1}})
    assert (cfg.preference.loss, cfg.preference.beta, cfg.preference.label_smoothing) == ("cdpo", 0.2, 0.1)
    rl_keys = {f.name for f in dataclasses.fields(cfg.algo)}
    assert not rl_keys & {"preference_loss", "beta", "label_smoothing", "simpo_gamma", "orpo_lambda", "slic_delta",
                          "slic_lambda", "kto_lambda_d", "kto_lambda_u"}


@pytest.mark.parametrize("old, new", sorted(MOVED_KEYS.items()))
def test_moved_key_names_its_new_place(tmp_path: Path, old: str, new: str) -> None:
    value = {"algo.preference_loss": "dpo", "rollout.async": "true"}.get(old, "0.1")
    section, key = old.split(".")
    expected = f"{old} moved to {new}"
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [f"{old}={value}"])
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, f"{section}:\n  {key}: {value}\n"))
    with pytest.raises(ConfigError, match=expected):  # as in a pipeline stage's config
        from_dict(Config, {section: {key: value}})
    new_section, new_key = new.split(".")
    typed = yaml.safe_load(value)  # a bool key takes a bool from a mapping (overrides and files parse YAML)
    assert getattr(getattr(from_dict(Config, {new_section: {new_key: typed}}), new_section), new_key) == typed


def test_moved_keys_are_the_preference_loss_parameters_and_rollout_async() -> None:
    assert MOVED_KEYS == {
        "algo.preference_loss": "preference.loss",
        **{f"algo.{key}": f"preference.{key}" for key in (
            "beta", "label_smoothing", "simpo_gamma", "orpo_lambda", "slic_delta", "slic_lambda", "kto_lambda_d",
            "kto_lambda_u")},
        "rollout.async": "rollout.async_generation",  # `async` is a Python keyword
    }
    preference_keys = {f.name for f in dataclasses.fields(PreferenceConfig)}
    assert {new.split(".")[1] for new in MOVED_KEYS.values() if new.startswith("preference.")} <= preference_keys


# --------------------------------------------------------------------------------------------------
# load_config sources: a path, a mapping, a Config
# --------------------------------------------------------------------------------------------------


def test_load_config_from_a_dict_with_overrides() -> None:
    source = {"train": {"lr": 1e-5, "steps": 3}, "data": {"task_kwargs": {"ops": {"plus": True}}}}
    before = {"train": {"lr": 1e-5, "steps": 3}, "data": {"task_kwargs": {"ops": {"plus": True}}}}
    cfg = load_config(source, ["train.steps=7", "rollout.n=4"])
    assert cfg.train.lr == pytest.approx(1e-5) and cfg.train.steps == 7 and cfg.rollout.n == 4
    cfg.data.task_kwargs["ops"]["plus"] = False
    assert source == before  # neither loading nor changing the result touches the caller's dict
    assert load_config({}) == Config()
    with pytest.raises(ConfigError, match="Did you mean 'train.lr'"):
        load_config({"train": {"lrr": 1e-5}})


def test_load_config_from_a_config_copies_it() -> None:
    original = Config()
    original.train.steps = 5
    original.data.task_kwargs["num_terms"] = 2
    cfg = load_config(original, ["train.lr=1e-5", "data.task_kwargs.num_terms=3"])
    assert cfg.train.steps == 5 and cfg.train.lr == pytest.approx(1e-5) and cfg.data.task_kwargs == {"num_terms": 3}
    assert original.train.lr == TrainConfig().lr and original.data.task_kwargs == {"num_terms": 2}  # not mutated
    assert cfg is not original and load_config(original) == original
    original.rollout.n = 1  # a Config built by hand is validated too
    with pytest.raises(ConfigError, match="rollout.n=1"):
        load_config(original)


def test_load_config_from_a_path_with_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "preference:\n  loss: ipo\n  beta: 0.5\n")
    for source in (path, str(path)):
        cfg = load_config(source, ["preference.beta=0.25", "train.steps=2"])
        assert (cfg.preference.loss, cfg.preference.beta, cfg.train.steps) == ("ipo", 0.25, 2)


# --------------------------------------------------------------------------------------------------
# RL combinations that do not fit together (formerly checked when the RL trainer started)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, settings",
    [
        (["algo.kl_in_reward=true"], ["algo.kl_in_reward", "algo.kl_coef"]),
        (["algo.kl_target=0.01"], ["algo.kl_target", "algo.kl_coef"]),
        (["algo.policy_loss=gspo"], ["algo.policy_loss=gspo", "algo.loss_agg"]),
        (["algo.policy_loss=cispo", "algo.dual_clip_c=3"], ["algo.dual_clip_c", "algo.policy_loss"]),
        (["algo.advantage=bnpo", "algo.kl_in_reward=true", "algo.kl_coef=0.1"],
         ["algo.advantage=bnpo", "algo.kl_in_reward"]),
        (["algo.advantage=bnpo", "algo.overlong_buffer=4"], ["algo.advantage=bnpo", "algo.overlong_buffer"]),
        (["algo.advantage=remax", "algo.dynamic_sampling=true"], ["algo.advantage=remax", "algo.dynamic_sampling"]),
        (["algo.advantage=remax", "scoring.normalize=normalize_each_then_sum"],
         ["algo.advantage=remax", "scoring.normalize"]),
        # issue 17's methods
        (["algo.policy_loss=gmpo"], ["algo.policy_loss=gmpo", "algo.loss_agg"]),
        (["algo.policy_loss=sapo", "algo.dual_clip_c=3"], ["algo.dual_clip_c", "algo.policy_loss=sapo"]),
        (["algo.advantage=passk", "algo.passk_k=9"], ["algo.passk_k", "rollout.n"]),
        (["algo.advantage=passk", "algo.overlong_buffer=4"], ["algo.advantage=passk", "algo.overlong_buffer"]),
        (["algo.advantage=w_reinforce", "algo.kl_in_reward=true", "algo.kl_coef=0.1"],
         ["algo.advantage=w_reinforce", "algo.kl_in_reward"]),
        (["algo.advantage=gfpo", "algo.gfpo_k=9"], ["algo.gfpo_k", "rollout.n"]),
        (["algo.advantage=gfpo", "algo.gfpo_k=1"], ["algo.gfpo_k", "rollout.n"]),
        (["algo.advantage=rloo", "algo.adv_std_unbiased=true"], ["algo.adv_std_unbiased", "algo.advantage=grpo"]),
        (["algo.adv_std_unbiased=true", "algo.adv_std_scope=none"], ["algo.adv_std_unbiased", "algo.adv_std_scope"]),
        (["rollout.min_new_tokens=65"], ["rollout.min_new_tokens", "rollout.max_new_tokens=64"]),
        (["env.name=countdown", "rollout.min_new_tokens=2"], ["rollout.min_new_tokens", "env.name"]),
    ],
)
def test_incompatible_rl_combination_is_refused_naming_both_settings(overrides: list[str], settings: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    problems = str(exc.value).splitlines()[1:]
    assert len(problems) == 1, problems  # exactly one rule fires
    assert all(setting in problems[0] for setting in settings), problems[0]


def test_incompatible_rl_combination_messages_for_issue_17_pieces() -> None:
    # distill needs the KL-in-reward with k1 and a teacher: both rules name their settings
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["algo.advantage=distill"])
    msg = str(exc.value)
    assert "algo.kl_in_reward=true and algo.kl_estimator=k1" in msg and "algo.distill_teacher" in msg
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["algo.advantage=distill", "algo.distill_teacher=t", "algo.kl_in_reward=true",
                           "algo.kl_coef=1", "algo.kl_estimator=k1", "algo.kl_target=0.1"])
    assert "algo.kl_target adapts the KL coefficient, but with algo.advantage=distill" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["algo.ref_reset_every=10"])
    assert "algo.ref_reset_every resets the KL reference, but algo.kl_coef=0 loads none" in str(exc.value)


@pytest.mark.parametrize("overrides, needle", [
    (["critic.shared_backbone=true"], "algo.advantage=grpo uses no value model"),
    (["critic.shared_backbone=true", "algo.advantage=gae", "critic.name_or_path=x"],
     "critic.name_or_path='x' names a separate critic model"),
])
def test_shared_backbone_combinations_are_refused(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    problems = str(exc.value).splitlines()[1:]
    assert len(problems) == 1 and needle in problems[0], problems


@pytest.mark.parametrize("override, needle", [
    ("algo.clip_cov_ratio=0", "algo.clip_cov_ratio=0.0: must be in (0, 1]"),
    ("algo.kl_cov_ratio=1.5", "algo.kl_cov_ratio=1.5: must be in (0, 1]"),
    ("algo.entropy_top_ratio=0", "algo.entropy_top_ratio=0.0: must be in (0, 1]"),
    ("algo.clip_cov_ub=0.5", "algo.clip_cov_ub=0.5: must be > algo.clip_cov_lb (1.0)"),
    ("algo.kl_cov_coef=-1", "algo.kl_cov_coef=-1.0: must be >= 0"),
    ("algo.sapo_tau_neg=0", "algo.sapo_tau_neg=0.0: must be > 0"),
    ("algo.dppo_divergence=tv", "choose one of: binary_tv, binary_kl"),
    ("algo.dppo_delta_high=1.5", "algo.dppo_delta_high=1.5: must be in (0, 1]"),
    ("algo.opmd_tau=0", "algo.opmd_tau=0.0: must be > 0"),
    ("algo.opmd_baseline=max", "choose one of: mean, logavgexp"),
    ("algo.w_reinforce_lambda=2", "algo.w_reinforce_lambda=2.0: must be in [0, 1]"),
    ("algo.passk_k=0", "algo.passk_k=0: must be >= 1"),
    ("algo.gfpo_metric=short", "choose one of: length, reward_per_token"),
    ("algo.ref_reset_every=-1", "algo.ref_reset_every=-1: must be >= 0"),
    ("critic.value_coef=-0.5", "critic.value_coef=-0.5: must be >= 0"),
])
def test_issue_17_key_ranges(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert needle in str(exc.value)


def test_compatible_rl_combinations_load() -> None:
    load_config(None, ["algo.policy_loss=gmpo", "algo.loss_agg=seq_mean_token_mean", "algo.clip_eps_low=0.4"])
    load_config(None, ["algo.policy_loss=clip_cov", "algo.dual_clip_c=3"])
    load_config(None, ["algo.advantage=passk", "algo.passk_k=8"])
    load_config(None, ["algo.advantage=gfpo", "algo.gfpo_k=2", "algo.adv_std_unbiased=true"])
    load_config(None, ["algo.adv_std_unbiased=true", "algo.adv_eps=1e-4"])  # TRL's GRPO normalisation
    load_config(None, ["algo.dppo_divergence=binary_kl", "algo.dppo_delta_low=2.0", "algo.policy_loss=dppo"])
    load_config(None, ["algo.policy_loss=gspo", "algo.loss_agg=seq_mean_token_mean"])
    load_config(None, ["algo.kl_in_reward=true", "algo.kl_coef=0.05", "algo.kl_target=0.01"])
    load_config(None, ["algo.dual_clip_c=3"])
    load_config(None, ["algo.advantage=remax", "train.mini_batch_size=32"])
    load_config(None, ["algo.advantage=grpo", "algo.dynamic_sampling=true",
                       "scoring.normalize=normalize_each_then_sum"])


def test_group_size_is_required_once() -> None:
    # rollout.n >= 2 is one rule of the rollout section; no other section repeats it
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["rollout.n=1", "algo.advantage=rloo", "scoring.normalize=normalize_each_then_sum"])
    problems = str(exc.value).splitlines()[1:]
    assert len(problems) == 1 and problems[0].startswith("  - rollout.n=1:"), problems


# --------------------------------------------------------------------------------------------------
# rules that depend on the command
# --------------------------------------------------------------------------------------------------


def test_check_command() -> None:
    online = load_config(None, ["preference.online=true"])
    with pytest.raises(ConfigError, match="preference.online applies to postrl dpo, not postrl rm; set "
                                          "preference.online=false"):
        check_command(online, "rm")
    check_command(online, "dpo")  # a paired loss online is fine
    check_command(online, "train")
    online_kto = load_config(None, ["preference.online=true", "preference.loss=kto"])
    with pytest.raises(ConfigError, match="preference.online builds chosen/rejected pairs; preference.loss=kto"):
        check_command(online_kto, "dpo")
    offline_kto = load_config(None, ["preference.loss=kto"])
    for command in ("dpo", "rm", "sft", "train", "pipeline", "eval", "grpo", "rl"):
        check_command(offline_kto, command)
    with pytest.raises(ValueError, match="unknown command 'dpoo'"):
        check_command(offline_kto, "dpoo")


# --------------------------------------------------------------------------------------------------
# rollout.backend and run.report_to
# --------------------------------------------------------------------------------------------------


def test_rollout_backend_and_report_to() -> None:
    cfg = load_config(None)
    assert cfg.rollout.backend == "torch" and cfg.run.report_to == []
    cfg = load_config(None, ["rollout.backend=openai_server", "run.report_to=[tensorboard, wandb]"])
    assert cfg.rollout.backend == "openai_server" and cfg.run.report_to == ["tensorboard", "wandb"]
    # names are checked by the backend factory and the trackers when the run starts, not here
    cfg = load_config(None, ["rollout.backend=my_engine", "run.report_to=[my_tracker]"])
    assert cfg.rollout.backend == "my_engine" and cfg.run.report_to == ["my_tracker"]
    with pytest.raises(ConfigError, match="rollout.backend='': must not be empty"):
        load_config(None, ["rollout.backend=''"])
    with pytest.raises(ConfigError, match="run.report_to=.*names wandb more than once"):
        load_config(None, ["run.report_to=[wandb, tensorboard, wandb]"])
    with pytest.raises(ConfigError, match=r"'run\.report_to' expects list\[str\]"):
        load_config({"run": {"report_to": "wandb"}})
