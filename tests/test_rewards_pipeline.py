"""The reward pipeline: combination modes, failure isolation, the process pool with timeouts."""

from __future__ import annotations

import os
import time

import pytest
import torch

from postrl.algorithms.reward_combine import combine_rewards
from postrl.config import Config, ConfigError, RewardSpec, ScoringConfig, from_dict, validate
from postrl.data.sources import Sample
from postrl.rewards import REWARDS, RewardBatch, RewardPipeline, Scored, register_reward, resolve_reward
from postrl.rewards.pool import TimeoutPool


# ----- module-level functions: the process pool pickles them by reference ---------------------------
def square(x):
    return x * x


def sleepy(x):
    if x == 2:
        time.sleep(60)
    return x


def crashy(x):
    if x == 1:
        os._exit(3)
    if x == 2:
        raise KeyError("no such key")
    return x


@register_reward("_test_len_parallel", parallel=True)
def len_parallel(completion, sample, **kwargs):
    if completion == "hang":
        time.sleep(60)
    return float(len(completion))


@register_reward("_test_raises_on_7")
def raises_on_7(completion, sample):
    if completion == "7":
        raise ZeroDivisionError("boom")
    return 1.0


@register_reward("_test_status")
def with_status(completion, sample):
    return Scored(0.5, {"status": "short" if len(completion) < 2 else "long"})


@register_reward("_test_batched", batched=True)
def batched_ids(batch: RewardBatch, scale: float = 1.0):
    return [scale * len(ids) if ids else None for ids in batch.completion_ids]


@register_reward("_test_counter", batched=True)
class CountingReward:
    instances = 0

    def __init__(self, context, bonus: float = 0.0):
        CountingReward.instances += 1
        self.context, self.bonus = context, bonus

    def __call__(self, batch):
        return [self.bonus + (1.0 if c == s.answer else 0.0) for c, s in zip(batch.completions, batch.samples)]


def _samples(n, answer="1"):
    return [Sample(question=f"q{i}", answer=answer, uid=f"u{i}") for i in range(n)]


# ----- combination ---------------------------------------------------------------------------------
def test_combine_sum_then_normalize_is_the_weighted_sum():
    a = torch.tensor([1.0, 0.0, 1.0, 1.0])
    b = torch.tensor([0.2, 0.2, 0.0, 0.1])
    out = combine_rewards({"a": a, "b": b}, {"a": 1.0, "b": 0.5}, group_size=2)
    assert torch.allclose(out, torch.tensor([1.1, 0.1, 1.0, 1.05]))


def test_combine_normalize_each_then_sum_by_hand():
    # group 1: a = [1, 0] -> mean .5, std .5 -> [+1, -1]; b = [.2, .2] -> constant -> [0, 0]
    # group 2: a = [1, 1] -> [0, 0];                     b = [0, .1] -> mean .05, std .05 -> [-1, +1], weight .5
    a = torch.tensor([1.0, 0.0, 1.0, 1.0])
    b = torch.tensor([0.2, 0.2, 0.0, 0.1])
    out = combine_rewards({"a": a, "b": b}, {"a": 1.0, "b": 0.5}, group_size=2, mode="normalize_each_then_sum",
                          eps=1e-9)
    assert torch.allclose(out, torch.tensor([1.0, -1.0, -0.5, 0.5]), atol=1e-6)


def test_combine_rejects_bad_input():
    a = torch.ones(4)
    with pytest.raises(ValueError, match="not one of"):
        combine_rewards({"a": a}, {"a": 1.0}, 2, mode="mean")
    with pytest.raises(ValueError, match="multiple of group_size"):
        combine_rewards({"a": a}, {"a": 1.0}, 3)
    with pytest.raises(ValueError, match="no weight"):
        combine_rewards({"a": a}, {}, 2)
    with pytest.raises(ValueError, match="same length"):
        combine_rewards({"a": a, "b": torch.ones(2)}, {"a": 1, "b": 1}, 2)


# ----- isolation -----------------------------------------------------------------------------------
def test_one_raising_completion_leaves_the_other_63_intact():
    pipe = RewardPipeline([RewardSpec("_test_raises_on_7"), RewardSpec("_test_status", weight=2.0)])
    texts = [str(i) for i in range(64)]
    res = pipe(texts, _samples(64))
    comp = res.components["_test_raises_on_7"]
    assert comp[7] == 0.0 and res.failed["_test_raises_on_7"][7]
    assert [c for i, c in enumerate(comp) if i != 7] == [1.0] * 63
    assert sum(res.failed["_test_raises_on_7"]) == 1
    assert res.errors == {("_test_raises_on_7", "ZeroDivisionError"): 1}
    # the other reward is untouched, statuses are counted
    assert res.components["_test_status"] == [0.5] * 64
    assert res.statuses[("_test_status", "short")] == 10 and res.statuses[("_test_status", "long")] == 54
    assert res.total[7] == pytest.approx(1.0) and res.total[8] == pytest.approx(2.0)


def test_failure_score_per_reward_and_global():
    pipe = RewardPipeline([RewardSpec("_test_raises_on_7", failure_score=-1.0)])
    assert pipe(["7", "1"], _samples(2)).total == [-1.0, 1.0]
    pipe = RewardPipeline([RewardSpec("_test_raises_on_7")], scoring=ScoringConfig(failure_score=-0.5))
    assert pipe(["7"], _samples(1)).total == [-0.5]


def test_batched_reward_none_marks_only_that_completion_failed():
    pipe = RewardPipeline([RewardSpec("_test_batched", kwargs={"scale": 2.0})])
    res = pipe(["ab", "", "c"], _samples(3), completion_ids=[[5, 6], [], [7]])
    assert res.components["_test_batched"] == [4.0, 0.0, 2.0]
    assert res.failed["_test_batched"] == [False, True, False]
    assert res.errors[("_test_batched", "InvalidValue")] == 1


def test_batched_reward_returning_wrong_length_fails_the_batch_for_that_reward_only():
    @register_reward("_test_short_batch", batched=True)
    def short(batch):
        return [1.0]

    pipe = RewardPipeline([RewardSpec("_test_short_batch"), RewardSpec("_test_status")])
    res = pipe(["a", "b"], _samples(2))
    assert res.failed["_test_short_batch"] == [True, True]
    assert res.components["_test_status"] == [0.5, 0.5]


def test_class_reward_is_built_once_with_the_context():
    CountingReward.instances = 0
    pipe = RewardPipeline([RewardSpec("_test_counter", kwargs={"bonus": 0.25})], source="SRC")
    for _ in range(3):
        res = pipe(["1", "2"], _samples(2))
    assert CountingReward.instances == 1
    assert pipe.items[0].obj.context.source == "SRC"
    assert res.total == [1.25, 0.25]
    with pytest.raises(ConfigError, match=r"rewards.0 \(_test_counter\): CountingReward takes no argument 'nope'; valid: bonus"):
        RewardPipeline([RewardSpec("_test_counter", kwargs={"nope": 1})])


def test_same_reward_twice_gets_distinct_labels():
    pipe = RewardPipeline([RewardSpec("_test_status"), RewardSpec("_test_status", weight=3.0)])
    res = pipe(["xy"], _samples(1))
    assert set(res.components) == {"_test_status.0", "_test_status.1"}
    assert res.total == [pytest.approx(2.0)]


def test_inline_kwargs_in_config_and_module_path_keeps_registered_shape():
    cfg = from_dict(Config, {"rewards": [{"name": "_test_batched", "weight": 1.0, "scale": 3.0}]})
    assert cfg.rewards[0].kwargs == {"scale": 3.0}
    assert resolve_reward(f"{__name__}:batched_ids").batched
    assert not resolve_reward(f"{__name__}:square").batched
    bad = Config()
    bad.scoring.normalize = "mean"
    bad.scoring.workers = -1
    with pytest.raises(ConfigError) as err:
        validate(bad)
    assert "scoring.normalize" in str(err.value) and "scoring.workers" in str(err.value)


def test_register_reward_rejects_parallel_batched():
    with pytest.raises(ValueError, match="parallel=True applies to per-completion"):
        register_reward("_x", batched=True, parallel=True)
    assert "_x" not in REWARDS


# ----- the pool ------------------------------------------------------------------------------------
def test_pool_timeout_kills_only_the_hung_task_and_recovers():
    with TimeoutPool(workers=2) as pool:
        t0 = time.monotonic()
        out = pool.run(sleepy, [(i,) for i in range(5)], timeout_s=3.0)
        elapsed = time.monotonic() - t0
        assert [r.ok for r in out] == [True, True, False, True, True]
        assert out[2].kind == "Timeout"
        assert [r.value for r in out if r.ok] == [0, 1, 3, 4]
        assert elapsed < 55  # the 60 s sleep was cut short (worker start-up is not counted in timeouts)
        assert pool.restarts == 1
        assert [r.value for r in pool.run(square, [(3,), (4,)])] == [9, 16]  # the pool still works


def test_pool_reports_exceptions_and_dead_workers():
    with TimeoutPool(workers=1) as pool:
        out = pool.run(crashy, [(0,), (1,), (2,), (3,)], timeout_s=20.0)
        assert out[0].ok and out[0].value == 0
        assert out[1].kind == "WorkerDied"
        assert out[2].kind == "KeyError" and "no such key" in out[2].message
        assert out[3].ok and out[3].value == 3


def test_parallel_reward_timeout_is_a_counted_failure():
    pipe = RewardPipeline([RewardSpec("_test_len_parallel", timeout_s=3.0)],
                          scoring=ScoringConfig(workers=2, failure_score=-1.0))
    try:
        res = pipe(["ab", "hang", "abcd"], _samples(3))
    finally:
        pipe.close()
    assert res.components["_test_len_parallel"] == [2.0, -1.0, 4.0]
    assert res.errors == {("_test_len_parallel", "Timeout"): 1}


def test_trainer_logs_each_component_and_error_fraction(tiny_config):
    from conftest import read_metrics

    from postrl.trainer import train

    cfg = tiny_config("train.steps=2", "eval.before=false", "eval.after=false",
                      "scoring.normalize=normalize_each_then_sum")
    cfg.rewards = [RewardSpec("task"), RewardSpec("_test_status", weight=0.1)]
    run_dir, _ = train(cfg)
    rows = read_metrics(run_dir)
    assert len(rows) == 2
    for row in rows:
        assert "reward/task" in row and row["reward/_test_status"] == pytest.approx(0.5)
        assert row["reward_error_frac/task"] == 0.0
        assert any(k.startswith("reward_status/_test_status/") for k in row)


# ----- text prompts and prompt ids ----------------------------------------------------------------------
def test_batch_with_token_id_prompts_is_refused_with_a_clear_message():
    with pytest.raises(TypeError, match=r"prompts\[0\] is a list .*prompt_ids="):
        RewardBatch(prompts=[[1, 2, 3]], completions=["a"], completion_ids=[[4]], samples=_samples(1))
    pipe = RewardPipeline([RewardSpec("_test_status")])
    with pytest.raises(TypeError, match="not str"):
        pipe(["a", "b"], _samples(2), prompts=[[1, 2], [3]])
    with pytest.raises(ValueError, match="prompt_ids has 1 entries"):
        RewardBatch(["p", "q"], ["a", "b"], [[1], [2]], _samples(2), prompt_ids=[[1]])


def test_a_reward_sees_text_prompts_and_prompt_ids():
    seen = {}

    @register_reward("_test_sees_prompts", batched=True)
    def sees(batch):
        seen["prompts"], seen["prompt_ids"] = batch.prompts, batch.prompt_ids
        return [1.0] * len(batch)

    pipe = RewardPipeline([RewardSpec("_test_sees_prompts")])
    pipe(["a", "b"], _samples(2), prompts=["<|user|>q0", "<|user|>q1"], prompt_ids=[[2, 7], [2, 8]])
    assert seen == {"prompts": ["<|user|>q0", "<|user|>q1"], "prompt_ids": [[2, 7], [2, 8]]}
    pipe(["a"], _samples(1))  # no prompt ids given: None, prompts default to ""
    assert seen == {"prompts": [""], "prompt_ids": None}


# ----- Python callables as rewards ----------------------------------------------------------------------
def _meta_samples():
    return [Sample("copy 12", "12", {"task": "toy-copy", "tests": [1]}, uid="a"),
            Sample("copy 34", "34", {"task": "toy-copy", "extra": "x"}, uid="b")]


def test_trl_style_function_gets_text_prompts_ids_answers_and_metadata_columns():
    calls = []

    def trl_reward(prompts, completions, completion_ids, **kwargs):
        calls.append(dict(kwargs, prompts=prompts, completions=completions, completion_ids=completion_ids))
        return [float(c == a) for c, a in zip(completions, kwargs["answer"])]

    pipe = RewardPipeline([trl_reward])
    res = pipe(["12", "35"], _meta_samples(), prompts=["P0", "P1"], completion_ids=[[1, 2], [3, 5]],
               prompt_ids=[[9], [8]])
    assert res.components == {"python:trl_reward": [1.0, 0.0]} and not res.errors
    (kw,) = calls  # one call per batch
    assert kw["prompts"] == ["P0", "P1"] and kw["completions"] == ["12", "35"]
    assert kw["completion_ids"] == [[1, 2], [3, 5]] and kw["prompt_ids"] == [[9], [8]]
    assert kw["answer"] == ["12", "34"] and kw["question"] == ["copy 12", "copy 34"]
    assert kw["task"] == ["toy-copy", "toy-copy"]
    assert kw["tests"] == [[1], None] and kw["extra"] == [None, "x"]


def test_trl_style_function_without_kwargs_gets_only_what_it_names_plus_spec_kwargs():
    def exact(completions, answer, bonus=0.0):
        return [bonus + float(c == a) for c, a in zip(completions, answer)]

    pipe = RewardPipeline([{"fn": exact, "weight": 2.0, "name": "exact", "kwargs": {"bonus": 0.5}}])
    res = pipe(["12", "0"], _meta_samples())
    assert res.components["exact"] == [1.5, 0.5] and res.total == [3.0, 1.0]


def test_trl_style_none_or_nan_fails_one_completion_and_wrong_length_fails_the_batch(caplog):
    def gaps(prompts, completions, **kw):
        return [None, float("nan"), 1.0]

    def too_short(prompts, completions, **kw):
        return [1.0]

    with caplog.at_level("WARNING", logger="postrl.rewards"):
        res = RewardPipeline([gaps, too_short])(["a", "b", "c"], _samples(3))
    assert res.components["python:gaps"] == [0.0, 0.0, 1.0]
    assert res.failed["python:gaps"] == [True, True, False]
    assert res.failed["python:too_short"] == [True, True, True]
    assert res.errors[("python:too_short", "InvalidValue")] == 3
    assert "python:too_short" in caplog.text and "returned 1 values for 3 completions" in caplog.text
    assert "too_short" in caplog.text.split("returned 1 values")[0]  # the function is named


def test_postrl_style_objects_per_completion_batched_and_registered():
    def per_completion(completion, sample, scale=1.0):
        return scale * len(completion)

    def batched(batch):
        return [float(len(ids)) for ids in batch.completion_ids]

    pipe = RewardPipeline([(per_completion, 0.5), batched, batched_ids, CountingReward])
    res = pipe(["ab", "c"], _samples(2, answer="c"), completion_ids=[[1, 2, 3], [4]])
    assert res.components["python:per_completion"] == [2.0, 1.0]
    assert res.components["python:batched"] == [3.0, 1.0]
    assert res.components["_test_batched"] == [3.0, 1.0]  # decorated: keeps its name and shape
    assert res.components["_test_counter"] == [0.0, 1.0]  # a registered class is built with the context
    assert res.total == [1.0 + 3 + 3 + 0, 0.5 + 1 + 1 + 1]


def test_reward_style_rule_and_clear_errors():
    from postrl.rewards import reward_style

    assert reward_style(lambda prompts, completions, **kw: []) == "trl"
    assert reward_style(lambda completions, **kw: []) == "trl"
    assert reward_style(lambda **kwargs: []) == "trl"
    assert reward_style(lambda completion, sample, **kw: 0.0) == "completion"
    assert reward_style(lambda batch: []) == "batch"
    for bad in (lambda text, gold: 0.0, lambda: 0.0, lambda *args: 0.0):
        with pytest.raises(TypeError, match="cannot tell how to call it.*prompts, completions.*completion, sample"):
            RewardPipeline([bad])

    class NotRegistered:
        def __call__(self, batch):
            return []

    with pytest.raises(TypeError, match="register_reward"):
        RewardPipeline([NotRegistered])
    assert RewardPipeline([NotRegistered()]).items[0].entry.batched  # an instance is a batched function
    with pytest.raises(TypeError, match="not a reward"):
        RewardPipeline([3])
    with pytest.raises(TypeError, match="finite number"):
        RewardPipeline([(batched_ids, "heavy")])
    with pytest.raises(TypeError, match="unknown keys"):
        RewardPipeline([{"fn": batched_ids, "wieght": 2}])


def test_python_rewards_registers_then_unregisters_and_makes_names_unique():
    from postrl.rewards import python_rewards

    def score(prompts, completions, **kw):
        return [1.0] * len(completions)

    def other():  # a second function with the same __name__
        def score(completion, sample):
            return 0.0
        return score

    before = set(REWARDS)
    with python_rewards({score: 2.0, other(): 1.0, "_test_status": 0.5}) as specs:
        assert [(s.name, s.weight) for s in specs] == [("python:score", 2.0), ("python:score#2", 1.0),
                                                      ("_test_status", 0.5)]
        assert REWARDS["python:score"].fn is score and REWARDS["python:score"].trl_style
        assert not REWARDS["python:score#2"].batched
        res = RewardPipeline(specs)(["a"], _samples(1))  # the specs travel by name, as in a config
        assert res.components == {"python:score": [1.0], "python:score#2": [0.0], "_test_status": [0.5]}
    assert set(REWARDS) == before
    with pytest.raises(RuntimeError):
        with python_rewards([score]):
            assert "python:score" in REWARDS
            raise RuntimeError("the trainer failed")
    assert set(REWARDS) == before
    with pytest.raises(ConfigError, match="taken"):
        with python_rewards([{"fn": score, "name": "_test_status"}]):
            pass
    with pytest.raises(ConfigError, match="empty"):
        with python_rewards([]):
            pass
    with pytest.raises(ConfigError, match="registered in-process.*rewards="):
        resolve_reward("python:score")
