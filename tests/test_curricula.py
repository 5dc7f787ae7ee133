"""Curricula, data selection and guidance (issue 16): every formula against a hand-worked example, the task
mixture, the pure batch assembly of SPEED / Guide / LUFFY, and the config checks. Training runs (resume, the
default sampler's identity, guidance in the trainer) are in tests/test_curricula_training.py."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from postrl.config import ConfigError, load_config
from postrl.config.curriculum import GUIDANCE_NAMES, SAMPLER_NAMES
from postrl.data import DataError, Sample
from postrl.data.guidance import (GUIDANCE, GuideHints, PrefixHint, TeacherTraces, build_guidance, check_reference,
                                  hint_prefix, hinted_sample, linear_share, luffy_shaped_loss, teacher_sample)
from postrl.data.mixture import TASK_KEY, MixtureSource, mixture_eval, per_task_metrics, task_eval_metrics
from postrl.data.sampler import PromptSampler
from postrl.data.samplers import (SAMPLERS, DifficultyFilterSampler, DumpSampler, LearnabilitySampler, MoppsSampler,
                                  RolloutLedger, SpeedSampler, UniformSampler, build_sampler, ema_update,
                                  observations, ucb_probabilities, ucb_scores, zero_variance)
from postrl.data.toy import ToySource
from postrl.rollout.batch import RolloutBatch
from postrl.rollout.generator import Generation
from postrl.rollout.selection import (guide_failed_groups, luffy_rollout, merge_groups, speed_rollout,
                                      teacher_generation)

DOCS = Path(__file__).resolve().parent.parent / "docs"


def samples(n: int, task: str | None = None, **meta) -> list[Sample]:
    out = []
    for i in range(n):
        m = dict(meta)
        if task is not None:
            m[TASK_KEY] = task
        uid = f"{task}/{i}" if task else f"s{i}"
        out.append(Sample(question=f"q{uid}", answer=str(i % 10), metadata=m, uid=uid))
    return out


def source(train, weights=None):
    return SimpleNamespace(train=train, weights=weights)


# ---------------------------------------------------------------------------------------------------------------
# registries and docs
# ---------------------------------------------------------------------------------------------------------------


def test_config_names_match_the_registries_and_every_name_is_documented():
    assert set(SAMPLER_NAMES) == set(SAMPLERS)
    assert set(GUIDANCE_NAMES) == set(GUIDANCE)
    text = (DOCS / "curricula.md").read_text()
    for name in (*SAMPLERS, *GUIDANCE):
        assert f"`{name}`" in text, name


def test_every_sampler_and_guidance_method_has_a_recipe():
    recipes = Path(__file__).resolve().parent.parent / "recipes"
    for name in SAMPLERS:
        if name != "uniform":
            assert (recipes / f"curriculum_{name}.yaml").exists(), name
    for name in GUIDANCE:
        if name != "none":
            assert (recipes / f"guidance_{name}.yaml").exists(), name


# ---------------------------------------------------------------------------------------------------------------
# uniform: exactly today's PromptSampler for one source
# ---------------------------------------------------------------------------------------------------------------


def test_uniform_sampler_draws_exactly_what_prompt_sampler_draws():
    train = samples(13)
    a, b = UniformSampler(source(train), seed=4), PromptSampler(train, seed=4)
    for k in (3, 5, 7, 13, 1, 9) * 3:
        assert a.next_batch(k) == b.next_batch(k)
    assert a.state_dict() == b.state_dict()  # same format: checkpoints written before the registry load
    c = UniformSampler(source(train), seed=4)
    c.load_state_dict(b.state_dict())
    assert c.next_batch(6) == b.next_batch(6)


def test_uniform_mixture_picks_tasks_by_weight_and_walks_each_task():
    train = samples(10, "a") + samples(10, "b")
    s = UniformSampler(source(train, {"a": 0.25, "b": 0.75}), seed=1)
    batch = s.next_batch(8)
    picks = np.random.default_rng([1, 1, 0]).choice(2, size=8, p=[0.25, 0.75])
    assert [x.metadata[TASK_KEY] for x in batch] == [["a", "b"][j] for j in picks]
    walk_a = PromptSampler([x for x in train if x.metadata[TASK_KEY] == "a"], seed=1 + 7919)
    assert [x for x in batch if x.metadata[TASK_KEY] == "a"] == walk_a.next_batch(int((picks == 0).sum()))
    drawn = [x.metadata[TASK_KEY] for _ in range(200) for x in s.next_batch(8)]
    assert drawn.count("b") / len(drawn) == pytest.approx(0.75, abs=0.03)
    state = json.loads(json.dumps(s.state_dict()))
    future = [s.next_batch(5) for _ in range(4)]
    t = UniformSampler(source(train, {"a": 0.25, "b": 0.75}), seed=1)
    t.load_state_dict(state)
    assert [t.next_batch(5) for _ in range(4)] == future


# ---------------------------------------------------------------------------------------------------------------
# running success estimate, difficulty filter, learnability
# ---------------------------------------------------------------------------------------------------------------


def test_running_success_estimate_and_observations_by_hand():
    assert ema_update(None, 0.25, 0.5) == 0.25  # first observation: the rate itself
    assert ema_update(0.25, 1.0, 0.5) == 0.625  # (1 - 0.5) * 0.25 + 0.5 * 1
    assert ema_update(0.625, 0.0, 0.2) == pytest.approx(0.5)  # 0.8 * 0.625
    a, b = samples(2)
    hinted = hinted_sample(a, "1", "{question} {hint}")
    obs = observations([a, a, a, b, b, hinted], [1.0, 0.0, 1.0, 0.2, 0.0, 1.0], threshold=1.0)
    assert obs == {"s0": (2, 3), "s1": (0, 2)}  # the hinted row is not an observation of s0


def test_difficulty_filter_keeps_unknown_and_in_range_prompts_and_counts_skips():
    train = samples(6)
    f = DifficultyFilterSampler(source(train), seed=0, lo=0.2, hi=0.8, ema=0.5)
    stream = PromptSampler(train, seed=0)
    order = stream.next_batch(6) + stream.next_batch(6)
    f.p_hat = {order[0].uid: 0.0, order[1].uid: 0.5, order[2].uid: 1.0}
    # order[0] (p=0) and order[2] (p=1) are skipped, order[1] (p=0.5) and unseen prompts kept
    assert f.next_batch(3) == [order[1], order[3], order[4]]
    m = f.metrics()
    assert m["sampler/skipped"] == 2 and m["sampler/forced"] == 0 and m["sampler/known_frac"] == 0.5
    assert f.metrics()["sampler/skipped"] == 0  # per-step counters are reset

    g = DifficultyFilterSampler(source(train), seed=0, lo=0.2, hi=0.8)
    g.p_hat = {s.uid: 1.0 for s in train}  # nothing in range: after one pass the batch is filled unfiltered
    got = g.next_batch(2)
    assert got == order[6:8] and g.metrics()["sampler/forced"] == 2
    g.update([train[0]] * 4, [1, 0, 0, 0], [0] * 4)
    assert g.p_hat[train[0].uid] == pytest.approx(0.5 * 1.0 + 0.5 * 0.25)
    with pytest.raises(DataError, match="data.sampler.kwargs.hi"):
        DifficultyFilterSampler(source(train), lo=0.5, hi=0.4)


def test_learnability_probabilities_by_hand():
    train = samples(4)
    s = LearnabilitySampler(source(train), seed=0, prior=0.5, floor=0.01)
    s.p_hat = {"s0": 0.5, "s1": 0.0, "s2": 0.9}  # s3 unseen -> prior 0.5
    w = np.array([0.25 + 0.01, 0.0 + 0.01, 0.09 + 0.01, 0.25 + 0.01])
    assert s.probabilities() == pytest.approx(w / w.sum())
    # a mixture: base probability weight_j / N_j
    mix = samples(2, "a") + samples(1, "b")
    t = LearnabilitySampler(source(mix, {"a": 0.5, "b": 0.5}), seed=0, floor=0.0)
    assert t.probabilities() == pytest.approx([0.25, 0.25, 0.5])  # all unseen: p(1-p) = 0.25 each
    batch = s.next_batch(3)
    idx = np.random.default_rng([0, 3, 0]).choice(4, size=3, replace=False, p=w / w.sum())
    assert batch == [train[i] for i in idx] and len({x.uid for x in batch}) == 3


# ---------------------------------------------------------------------------------------------------------------
# MoPPS
# ---------------------------------------------------------------------------------------------------------------


def test_mopps_posterior_update_and_thompson_selection_by_hand():
    train = samples(6)
    m = MoppsSampler(source(train), seed=2, target=0.5, candidates=2, decay=0.5, alpha0=1.0, beta0=1.0)
    m.update([train[0]] * 4, [1, 1, 1, 0], [0] * 4)
    assert m.posterior["s0"] == [4.0, 2.0]  # 0.5*1 + 0.5*1 + 3, 0.5*1 + 0.5*1 + 1
    m.update([train[0]] * 4, [0, 0, 0, 0], [0] * 4)
    assert m.posterior["s0"] == [2.5, 5.5]  # 0.5*4 + 0.5 + 0, 0.5*2 + 0.5 + 4
    assert m.select(train[:4], np.array([0.9, 0.45, 0.1, 0.6]), 2) == [1, 3]  # |d - 0.5| = .4 .05 .4 .1

    stream = PromptSampler(train, seed=2)
    cands = stream.next_batch(4)
    rng = np.random.default_rng([2, 5, 0])
    draws = np.array([rng.beta(*((2.5, 5.5) if c.uid == "s0" else (1.0, 1.0))) for c in cands])
    keep = sorted(np.argsort(np.abs(draws - 0.5), kind="stable")[:2])
    assert m.next_batch(2) == [cands[i] for i in keep]
    assert m.metrics()["sampler/skipped"] == 2


# ---------------------------------------------------------------------------------------------------------------
# DUMP
# ---------------------------------------------------------------------------------------------------------------


def test_dump_ucb_and_softmax_by_hand():
    # means [0.5, 0.2], counts [3, 1]: bonus sqrt(2 ln 4 / n)
    scores = ucb_scores([0.5, 0.2], [3, 1], c=1.0)
    assert scores == pytest.approx([0.5 + math.sqrt(2 * math.log(4) / 3), 0.2 + math.sqrt(2 * math.log(4))])
    p = ucb_probabilities(scores, temperature=0.1)
    assert p[1] == pytest.approx(1 / (1 + math.exp(-(scores[1] - scores[0]) / 0.1)))
    assert list(ucb_probabilities(ucb_scores([0.9, 0.0, 0.0], [5, 0, 0], 1.0), 0.1)) == [0.0, 0.5, 0.5]


def test_dump_counts_prompts_keeps_a_window_of_abs_advantages_and_resumes():
    train = samples(4, "easy") + samples(4, "hard")
    d = DumpSampler(source(train, {"easy": 0.5, "hard": 0.5}), seed=0, window=3, c=1.0, temperature=0.1)
    assert list(d.probabilities()) == [0.5, 0.5]  # both unvisited
    easy, hard = train[0], train[4]
    d.update([easy] * 2 + [hard] * 2, [1, 0, 0, 0], [1.0, -1.0, 0.0, 0.0])
    d.update([easy] * 2, [1, 1], [0.0, 0.0])
    assert d.counts == {"easy": 2, "hard": 1} and list(d.adv["easy"]) == [1.0, 0.0, 0.0]  # window of 3
    expect = ucb_scores([1 / 3, 0.0], [2, 1], 1.0)
    assert d.scores() == pytest.approx(expect)
    state = json.loads(json.dumps(d.state_dict()))
    future = [d.next_batch(4) for _ in range(3)]
    e = DumpSampler(source(train, {"easy": 0.5, "hard": 0.5}), seed=0, window=3)
    e.load_state_dict(state)
    assert [e.next_batch(4) for _ in range(3)] == future


# ---------------------------------------------------------------------------------------------------------------
# batch assembly: merge_groups, SPEED, Guide, LUFFY (with a fake group sampler)
# ---------------------------------------------------------------------------------------------------------------


class FakeSampler:
    """Group sampler: completion j of sample s has reward outcome[s.uid][j] (cycled); one token per row whose id
    encodes (sample index, row); behaviour log-prob -1 (hinted prompts: -0.5)."""

    def __init__(self, outcomes):
        self.outcomes, self.calls = outcomes, []

    def __call__(self, batch_samples, seed, n=0, gen=None):
        self.calls.append((list(batch_samples), n, gen is not None))
        group = [s for s in batch_samples for _ in range(n)]
        B = len(group)
        if gen is None:
            ids = torch.tensor([[100 + i] for i in range(B)])
            lp = torch.tensor([[-0.5 if "hint" in s.metadata else -1.0] for s in group])
            gen = Generation([[7, int(s.uid[-1]) if s.uid[-1].isdigit() else 0] for s in group], ids,
                             torch.ones(B, 1, dtype=torch.long), lp, torch.zeros(B, dtype=torch.bool), 1,
                             torch.zeros(B, 1))
        batch = RolloutBatch.from_generation(gen, group, ["p"] * B, ["t"] * B, n, policy_version=3)
        key = lambda s: s.metadata.get("orig_uid", s.uid) + ("#hint" if "hint" in s.metadata else "")  # noqa: E731
        rewards = [self.outcomes[key(s)][j % len(self.outcomes[key(s)])] for s in batch_samples for j in range(n)]
        batch.rewards = torch.tensor(rewards, dtype=torch.float64)
        batch.correct = [r >= 1 for r in rewards]
        return batch


def test_merge_groups_lays_out_rows_group_major():
    fake = FakeSampler({"s0": [0, 1], "s1": [1]})
    two = samples(2)
    a, b = fake(two, 0, n=2), fake(two, 0, n=3)
    m = merge_groups(a, b, pad_id=0)
    assert m.group_ids.tolist() == [0] * 5 + [1] * 5
    assert m.completion_ids[:, 0].tolist() == [100, 101, 100, 101, 102, 102, 103, 103, 104, 105]
    assert [s.uid for s in m.samples] == ["s0"] * 5 + ["s1"] * 5


def test_speed_screens_and_completes_only_mixed_groups():
    train = samples(6)
    outcomes = {"s0": [1, 1], "s1": [0, 1], "s2": [0, 0], "s3": [1, 0], "s4": [0, 0], "s5": [1, 1]}
    sampler = SpeedSampler(source(train), seed=0, group_size=5, screen=2, max_tries=6)
    order = PromptSampler(train, seed=0).next_batch(6)
    fake, ledger = FakeSampler(outcomes), RolloutLedger()
    batch = speed_rollout(sampler, fake, want=2, n=5, seed=0, pad_id=0, ledger=ledger)
    mixed = [s for s in order if s.uid in ("s1", "s3")]
    assert [s.uid for s in batch.samples[::5]] == [s.uid for s in mixed]
    assert batch.group_ids.tolist() == [0] * 5 + [1] * 5 and len(batch) == 10
    assert batch.rewards[:2].tolist() in ([0, 1], [1, 0])  # the screen is part of the group
    screened = sum(len(c[0]) for c in fake.calls if c[1] == 2)
    m = sampler.metrics()
    assert m["sampler/screened"] == screened and m["sampler/skipped"] == screened - 2
    assert m["sampler/screen_rollouts"] == 2 * screened
    assert ledger.zero_var_groups_discarded == screened - 2 and ledger.zero_var_rows_discarded == 2 * (screened - 2)
    assert sorted(c[0][0].uid for c in fake.calls if c[1] == 3) == ["s1", "s3"]  # only they get n - screen more


def test_speed_completes_one_group_when_no_screen_passes():
    train = samples(3)
    sampler = SpeedSampler(source(train), seed=0, group_size=4, screen=2, max_tries=2)
    ledger = RolloutLedger()
    batch = speed_rollout(sampler, FakeSampler({f"s{i}": [0] for i in range(3)}), 2, 4, 0, 0, ledger)
    assert len(batch) == 4 and batch.sampling_tries == 2
    assert ledger.zero_var_groups_discarded == 3  # 4 screened, the completed one is trained on


def test_guide_regenerates_failed_groups_with_a_hint_and_trains_them_without_it():
    a, b = samples(2)
    guide = GuideHints(source([a, b]), group_size=4, field="answer", share=1.0, guided=2)
    fake = FakeSampler({"s0": [0, 0, 0, 0], "s1": [1, 0], "s0#hint": [1, 0]})
    batch = fake([a, b], 0, n=4)
    ledger = RolloutLedger()
    rendered = {a.uid: [1, 2, 3]}
    out = guide_failed_groups(batch, 4, guide, fake, lambda s: rendered[s.uid], lambda ids: f"text{ids}", 9, 0, ledger)
    assert out.group_ids.tolist() == [0] * 4 + [1] * 4
    assert [s.uid for s in out.samples[:4]] == ["s1"] * 4  # the group with a success is untouched
    assert out.rewards[4:].tolist() == [0, 0, 1, 0]  # two failures kept, two guided completions
    assert out.prompt_ids[6] == [1, 2, 3] and out.prompt_texts[6] == "text[1, 2, 3]"  # trained without the hint
    assert out.behaviour_logprobs[6:, 0].tolist() == [-0.5, -0.5]  # behaviour = the hinted sampler's
    assert out.samples[6].metadata["hint"] == "0" and out.samples[6].question.endswith("partial solution: 0")
    assert ledger.zero_var_rows_discarded == 2
    assert guide.metrics() == {"guidance/failed_groups": 1.0, "guidance/guided_correct_frac": 0.5}


def test_luffy_mixes_teacher_traces_into_each_group():
    from postrl.models.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    train = [Sample("copy 12", "12", {}, uid="a"), Sample("copy 3", "3", {}, uid="b")]
    lf = TeacherTraces(source(train), group_size=4, field="answer", traces=1, gamma=0.1)
    gen = teacher_generation([train[0]], ["12"], tok, lambda s: [5], max_new_tokens=8)
    assert gen.completion_ids[0].tolist() == tok("12", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert gen.logprobs.abs().sum() == 0 and not bool(gen.truncated[0])
    assert bool(teacher_generation([train[0]], ["1234567"], tok, lambda s: [5], 3).truncated[0])
    fake = FakeSampler({"a": [0], "b": [0]})
    out = luffy_rollout(train, lf, fake, tok, lambda s: [5], 8, n=4, seed=0, pad_id=tok.pad_token_id)
    assert out.group_ids.tolist() == [0] * 4 + [1] * 4
    assert out.policy_version.tolist() == [3, 3, 3, -1] * 2
    assert [bool(s.metadata.get("teacher")) for s in out.samples] == [False, False, False, True] * 2


def test_pick_teacher_traces_by_hand():
    from postrl.data.guidance import pick_teacher_traces

    # two prompts, 4 candidates each: right ones first (sampled order), then wrong ones when too few are right
    correct = [False, True, False, True, False, False, True, False]
    assert pick_teacher_traces(correct, 4, 2) == [1, 3, 6, 4]
    assert pick_teacher_traces(correct, 4, 1) == [1, 6]
    assert pick_teacher_traces([False, False], 2, 2) == [0, 1]
    with pytest.raises(ValueError, match="groups of 4"):
        pick_teacher_traces(correct[:6], 4, 1)
    with pytest.raises(ValueError):
        pick_teacher_traces(correct, 2, 3)


def test_luffy_with_a_teacher_model_keeps_its_right_candidates():
    from postrl.models.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    train = [Sample("copy 1", "1", {}, uid="a"), Sample("copy 2", "2", {}, uid="b")]  # no "solution" field
    lf = TeacherTraces(source(train), group_size=4, traces=1, teacher="some/teacher", teacher_samples=3)
    assert lf.teacher_samples == 3
    lf.check(train)  # traces from a model: the data needs no reference field
    with pytest.raises(DataError, match="'solution'"):
        TeacherTraces(source(train), group_size=4, traces=1).check(train)
    fake = FakeSampler({"a": [0], "b": [0]})
    teacher = FakeSampler({"a": [0, 0, 1], "b": [0, 0, 0]})  # candidate 2 of "a" is right, none of "b"
    calls = []

    def teacher_fn(samples, seed, m):
        calls.append(([s.uid for s in samples], m))
        return teacher(samples, seed, n=m)

    out = luffy_rollout(train, lf, fake, tok, lambda s: [5], 8, n=4, seed=0, pad_id=tok.pad_token_id,
                        teacher_fn=teacher_fn)
    assert calls == [(["a#teacher", "b#teacher"], 3)]
    assert out.policy_version.tolist() == [3, 3, 3, -1] * 2
    # the right candidate of "a" (row 2 of its three: token 102) and the first candidate of "b" (token 103)
    assert out.completion_ids[[3, 7], 0].tolist() == [102, 103]
    assert out.rewards[[3, 7]].tolist() == [1.0, 0.0]
    assert out.behaviour_logprobs[[3, 7]].abs().sum() == 0  # the teacher's probability taken as 1
    m = lf.metrics()
    assert m["guidance/teacher_candidates_correct_frac"] == pytest.approx(1 / 6)
    assert m["guidance/teacher_correct_frac"] == pytest.approx(0.5)


def test_luffy_teacher_settings_are_checked():
    train = [Sample("copy 1", "1", {}, uid="a")]
    for kwargs, key in (({"teacher": ""}, "teacher"), ({"teacher": "t", "teacher_temperature": -1}, "teacher_temperature"),
                        ({"teacher": "t", "traces": 2, "teacher_samples": 1}, "teacher_samples")):
        with pytest.raises(DataError, match=f"data.guidance.kwargs.{key}="):
            TeacherTraces(source(train), group_size=4, **kwargs)


def test_luffy_shaped_loss_value_and_gradient_by_hand():
    lp = torch.tensor([[math.log(0.1)]], requires_grad=True)
    loss = luffy_shaped_loss(lp, torch.tensor([[2.0]]), gamma=0.1)
    assert float(loss) == pytest.approx(-0.5 * 2)  # f(0.1) = 0.1 / 0.2
    loss.sum().backward()
    assert float(lp.grad) == pytest.approx(-2 * 0.1 * 0.1 / 0.2**2)  # -A gamma p / (p + gamma)^2
    lf = TeacherTraces(source(samples(1)), group_size=2, field="answer")
    base = torch.zeros(2, 1)
    shaped = lf.shape(base, torch.log(torch.tensor([[0.1], [0.1]])), torch.ones(2, 1), torch.tensor([False, True]))
    assert shaped.tolist() == [[0.0], [pytest.approx(-0.5)]]


# ---------------------------------------------------------------------------------------------------------------
# hints (QuestA) and the reference field
# ---------------------------------------------------------------------------------------------------------------


def test_hint_prefix_and_the_decaying_share_by_hand():
    assert hint_prefix("1284", 0.5) == "12" and hint_prefix("1284", 0.74) == "12" and hint_prefix("1284", 0.75) == "128"
    assert hint_prefix("1284", 0.0) == "" and hint_prefix("1284", 1.0) == "1284"
    assert hint_prefix("a b c d", 0.5, "word") == "a b"
    assert hint_prefix("x\ny\nz\n", 0.7, "line") == "x\ny"
    assert linear_share(0, 0.5, 0.0, 100) == 0.5 and linear_share(50, 0.5, 0.0, 100) == 0.25
    assert linear_share(300, 0.5, 0.1, 100) == pytest.approx(0.1) and linear_share(7, 0.3, 0.0, 0) == 0.3


def test_prefix_hints_copy_the_sample_and_decay_over_training():
    train = [Sample("reverse 4821", "1284", {"k": 1}, uid="u1")]
    q = PrefixHint(source(train), seed=0, total_steps=100, field="answer", start=0.5, end=0.0)
    first = q.prepare(train, 0)[0]
    assert first.question == "reverse 4821\npartial solution: 12" and first.answer == "1284"
    assert first.uid != "u1" and first.metadata["orig_uid"] == "u1" and first.metadata["hint"] == "12"
    assert train[0].question == "reverse 4821"  # the original is not changed
    assert q.prepare(train, 50)[0].metadata["hint"] == "1" and q.prepare(train, 100)[0] is train[0]
    m = q.metrics()
    assert m["guidance/hint_share"] == 0.0 and m["guidance/hinted_frac"] == 0.0
    half = PrefixHint(source(train), seed=0, field="answer", start=1.0, end=1.0, prob=0.5)
    many = [Sample("copy 12", "12", {}, uid=f"u{i}") for i in range(400)]
    assert sum("hint" in s.metadata for s in half.prepare(many, 3)) / 400 == pytest.approx(0.5, abs=0.08)
    assert [s.uid for s in half.prepare(many, 3)] == [s.uid for s in half.prepare(many, 3)]  # seeded per step


def test_a_dataset_without_the_reference_field_is_refused_naming_it():
    train = [Sample("q", "1", {"solution": "step"}, uid="a"), Sample("q2", "2", {}, uid="b")]
    with pytest.raises(DataError, match="'solution'.*1 of 2.*'b'"):
        check_reference(train, "solution", "prefix_hint")
    for name in ("prefix_hint", "guide", "luffy"):
        with pytest.raises(DataError, match="reference field 'worked'"):
            build_guidance(name, {"field": "worked"}, source(train), 0, 4, 10)
    build_guidance("luffy", {"field": "answer"}, source(train), 0, 4, 10)  # the answer itself is always there
    with pytest.raises(DataError, match="unknown keys 'gama'.*gamma=0.1"):
        build_guidance("luffy", {"gama": 1}, source(train), 0, 4, 10)
    with pytest.raises(DataError, match="unknown guidance method 'hint'; valid: none, prefix_hint, guide, luffy"):
        build_guidance("hint", {}, source(train), 0, 4, 10)


def test_hinted_and_teacher_copies_keep_the_original_identity():
    s = Sample("q", "a", {"x": 1}, uid="u")
    h, t = hinted_sample(s, "h", "{question}|{hint}"), teacher_sample(s)
    assert h.question == "q|h" and h.metadata["orig_uid"] == "u" and t.metadata == {"x": 1, "teacher": True,
                                                                                      "orig_uid": "u"}


# ---------------------------------------------------------------------------------------------------------------
# task mixtures
# ---------------------------------------------------------------------------------------------------------------


def test_mixture_tags_samples_and_scores_each_with_its_own_scorer():
    copy = ToySource("copy", {"length": 2, "partial_credit": False}, train_size=5, eval_size=3, seed=0)
    rev = ToySource("reverse", {"length": 3}, train_size=4, eval_size=2, seed=0)
    mix = MixtureSource([("c", 1.0, copy), ("r", 3.0, rev)])
    assert mix.weights == {"c": 0.25, "r": 0.75} and len(mix.train) == 9 and len(mix.eval) == 5
    assert {s.metadata[TASK_KEY] for s in mix.train} == {"c", "r"}
    assert mix.train[0].uid == "c/" + copy.train[0].uid and copy.train[0].metadata.get(TASK_KEY) is None
    r0 = next(s for s in mix.train if s.metadata[TASK_KEY] == "r")
    wrong = r0.answer[0] + "x" + r0.answer[2]
    assert mix.score(r0.answer, r0) == 1.0 and mix.score(wrong, r0) == pytest.approx(2 / 3)  # partial credit
    c0 = mix.train[0]
    assert mix.score(c0.answer[0] + "x", c0) == 0.0  # this task has partial_credit false
    with pytest.raises(DataError):
        MixtureSource([("a", 1.0, copy), ("a", 1.0, rev)])


def test_per_task_metrics_and_mixture_eval_by_hand():
    s = samples(2, "a") + samples(1, "b")
    rows = [s[0], s[0], s[1], s[1], s[2], s[2]]
    m = per_task_metrics(rows, [1.0, 0.0, 0.0, 0.0, 0.5, 0.5], [True, False, False, False, False, False],
                         [0, 0, 1, 1, 2, 2])
    assert m == {"reward/task/a": 0.25, "accuracy/task/a": 0.25, "groups/task/a": 2.0, "zero_var/task/a": 0.5,
                 "reward/task/b": 0.5, "accuracy/task/b": 0.0, "groups/task/b": 1.0, "zero_var/task/b": 1.0}
    mix = SimpleNamespace(task_names=["a", "b"], eval=s)
    res = {"a": {"accuracy": 0.5, "reward_mean": 0.5, "response_len_mean": 2, "n": 2, "examples": ["x"],
                 "pass@k": {"1": 0.5, "2": 1.0}},
           "b": {"accuracy": 1.0, "reward_mean": 1.0, "response_len_mean": 5, "n": 1, "examples": [],
                 "pass@k": {"1": 1.0, "2": 1.0}}}
    ev = mixture_eval(mix, lambda sub: res[sub[0].metadata[TASK_KEY]])
    assert ev["accuracy"] == pytest.approx(2 / 3) and ev["response_len_mean"] == 3 and ev["n"] == 3
    assert ev["pass@k"] == {"1": pytest.approx(2 / 3), "2": 1.0}
    assert task_eval_metrics(ev) == {"eval/accuracy/a": 0.5, "eval/reward_mean/a": 0.5, "eval/pass@1/a": 0.5,
                                     "eval/pass@2/a": 1.0, "eval/accuracy/b": 1.0, "eval/reward_mean/b": 1.0,
                                     "eval/pass@1/b": 1.0, "eval/pass@2/b": 1.0}


# ---------------------------------------------------------------------------------------------------------------
# zero-variance accounting
# ---------------------------------------------------------------------------------------------------------------


def test_zero_variance_accounting_by_hand():
    assert zero_variance([1, 1, 0, 1, 0, 0], [0, 0, 1, 1, 2, 2]) == (3, 2, 4)
    ledger = RolloutLedger()
    ledger.generated(10, 50)
    ledger.discarded(4, 2)  # e.g. two screened-out groups of 2
    m = ledger.metrics([1, 1, 0, 1, 0, 0], [0, 0, 1, 1, 2, 2], [True] * 5 + [False])
    assert m == {"zero_var/group_frac": 2 / 3, "zero_var/sampled_group_frac": 4 / 5, "zero_var/rollouts": 3 + 4,
                 "zero_var/rollouts_frac": 0.7, "rollouts_generated": 10.0, "gen_tokens_total": 50.0}


# ---------------------------------------------------------------------------------------------------------------
# rg_curriculum (reasoning-gym's curriculum API)
# ---------------------------------------------------------------------------------------------------------------


def test_rg_curriculum_raises_the_level_with_success_and_resumes():
    from postrl.data.sources import ReasoningGymSource

    src = ReasoningGymSource("basic_arithmetic", {}, train_size=8, eval_size=4, seed=0, answer_extraction="raw")
    cur = build_sampler("rg_curriculum", {"window": 4, "promote_at": 0.75, "pool": 16}, src, seed=0, group_size=2)
    batch = cur.next_batch(2)
    assert all(s.metadata["curriculum_level"] == 0 and s.metadata["num_terms"] == 2 for s in batch)
    cur.update(batch[:1] * 2, [1.0, 0.0], [0, 0])  # window not full yet: no move
    assert cur.metrics()["sampler/level/basic_arithmetic"] == 0
    cur.update(batch[:1] * 2, [1.0, 1.0], [0, 0])  # 3 of 4 >= 0.75: up one level
    m = cur.metrics()
    assert m["sampler/level/basic_arithmetic"] == 1 and m["sampler/promoted/basic_arithmetic"] == 1
    t = cur.tasks["basic_arithmetic"]
    assert t.levels == {"num_terms": 1, "num_digits": 1} and len(t.window) == 0
    nxt = cur.next_batch(8)
    assert all(s.metadata["curriculum_level"] == 1 for s in nxt)
    assert {s.metadata["num_terms"] for s in nxt} <= {2, 3} and max(s.metadata["num_digits"] for s in nxt) <= 2
    assert all(src.score(s.answer, s) == 1.0 for s in nxt)  # the source's scorer scores the generated entries
    state = json.loads(json.dumps(cur.state_dict()))
    future = [cur.next_batch(3) for _ in range(3)]
    again = build_sampler("rg_curriculum", {"window": 4, "promote_at": 0.75, "pool": 16}, src, seed=0, group_size=2)
    again.load_state_dict(state)
    assert [[s.uid for s in again.next_batch(3)] for _ in range(3)] == [[s.uid for s in b] for b in future]
    with pytest.raises(DataError, match="needs reasoning_gym tasks"):
        build_sampler("rg_curriculum", {}, ToySource("copy", {}, 5, 2), 0, 2)


# ---------------------------------------------------------------------------------------------------------------
# building samplers, config checks
# ---------------------------------------------------------------------------------------------------------------


def test_build_sampler_names_the_valid_samplers_and_keys():
    train = samples(4)
    with pytest.raises(DataError, match="unknown prompt sampler 'ucb'; valid samplers: difficulty_filter, dump"):
        build_sampler("ucb", {}, source(train), 0, 4)
    with pytest.raises(DataError, match="unknown keys 'low'.*lo=0.1, hi=0.9"):
        build_sampler("difficulty_filter", {"low": 0.2}, source(train), 0, 4)
    with pytest.raises(DataError, match="screen=8: must be an int in \\[1, rollout.n - 1 = 7\\]"):
        build_sampler("speed", {"screen": 8}, source(train), 0, 8)
    assert isinstance(build_sampler("uniform", {}, source(train), 0, 4), UniformSampler)


@pytest.mark.parametrize("overrides, message", [
    (["data.sampler.name=lernability"], "data.sampler.name='lernability' is not valid; choose one of: uniform"),
    (["data.guidance.name=questa"], "data.guidance.name='questa' is not valid; choose one of: none, prefix_hint"),
    (["data.sampler.name=speed", "algo.dynamic_sampling=true"], "turn algo.dynamic_sampling off"),
    (["data.sampler.name=mopps", "train.strategy=ddp"], "train.strategy=none only"),
    (["data.guidance.name=luffy", "algo.tis_mode=clamp"], "set it to off"),
    (["data.guidance.name=guide", "algo.advantage=remax"], "Use another estimator"),
    (["data.mixture=[{task: a}, {task: a}]"], "task names a occur more than once"),
    (["data.mixture=[{task: a, weight: 0}]"], "data.mixture.0.weight=0.0: must be > 0"),
    (["data.mixture=[{source: jsonl}]"], "data.mixture.0.source='jsonl' requires data.mixture.0.path"),
    (["data.mixture=[{task: a}]", "data.task=b"], "data.mixture replaces data.task"),
    (["data.mixture=[{task: a, answer_extraction: box}]"], "data.mixture.0.answer_extraction='box' is not valid"),
])
def test_config_refuses_bad_selection_settings(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", "\\[").replace("(", "\\(")):
        load_config(None, overrides)


def test_sampler_and_guidance_kwargs_are_written_next_to_the_name():
    cfg = load_config({"data": {"sampler": {"name": "mopps", "target": 0.3},
                                "guidance": {"name": "luffy", "field": "answer"}}})
    assert cfg.data.sampler.kwargs == {"target": 0.3} and cfg.data.guidance.kwargs == {"field": "answer"}
