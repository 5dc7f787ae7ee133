"""Reward models as rewards: ensemble combination (hand-worked), padding invariance, truncation,
the value-head format, loading a `postrl rm`-style directory, and clear errors for bad paths."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from postrl.config import RewardSpec
from postrl.data.sources import Sample
from postrl.models.loading import ModelLoadError
from postrl.models.tiny import build_char_tokenizer
from postrl.rewards import RewardPipeline
from postrl.rewards.base import RewardBatch, RewardContext, Scored
from postrl.rewards.reward_model import (
    VALUE_HEAD_FILE,
    RewardModelReward,
    combine_ensemble,
    load_reward_model,
    save_value_reward_model,
)


def _tiny_config(tok, num_labels: int = 1):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                       num_labels=num_labels)


def build_seq_cls_rm(path: Path, seed: int, num_labels: int = 1) -> Path:
    """A tiny LlamaForSequenceClassification + char tokenizer, saved as `postrl rm` would save it."""
    from transformers import LlamaForSequenceClassification

    tok = build_char_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(_tiny_config(tok, num_labels))
    with torch.no_grad():  # a visible head, so that scores differ clearly between inputs and seeds
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rm_dirs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("rms")
    return [build_seq_cls_rm(root / f"rm{i}", seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def value_rm_dir(tmp_path_factory) -> Path:
    from transformers import LlamaForCausalLM

    from postrl.models.value import ValueModel

    tok = build_char_tokenizer()
    torch.manual_seed(7)
    lm = LlamaForCausalLM(_tiny_config(tok))
    vm = ValueModel(lm)
    with torch.no_grad():
        vm.head.weight.normal_(0.0, 1.0)
        vm.head.bias.fill_(0.25)
    return save_value_reward_model(vm, tmp_path_factory.mktemp("vrm") / "value_rm", tokenizer=tok)


TEXTS = [("q: 1+1=?", " 2"), ("copy 7", " 7 7 7 7 7 7 7 7"), ("a", ""), ("what is 12 - 5?", " it is 7."),
         ("x", " y"), ("long prompt with many characters here", " and a short answer"), ("z", " 0")]


def make_batch(pairs=TEXTS) -> RewardBatch:
    return RewardBatch(prompts=[p for p, _ in pairs], completions=[c for _, c in pairs],
                       completion_ids=[[] for _ in pairs],
                       samples=[Sample(question=p, answer="") for p, _ in pairs])


def values(out) -> list[float]:
    return [o.score if isinstance(o, Scored) else o for o in out]


# ----- combine_ensemble: hand-worked ---------------------------------------------------------------------------
SCORES = torch.tensor([[1.0, 0.0], [2.0, 0.0], [6.0, 3.0]], dtype=torch.float64)  # K=3 models, B=2 samples
# column 0: mean 3, min 1, population var ((1-3)^2 + (2-3)^2 + (6-3)^2) / 3 = 14/3
# column 1: mean 1, min 0, population var (1 + 1 + 4) / 3 = 2


def test_combine_mean_and_min():
    assert combine_ensemble(SCORES, "mean").tolist() == [3.0, 1.0]
    assert combine_ensemble(SCORES, "min").tolist() == [1.0, 0.0]


def test_combine_mean_minus_std_uses_population_std():
    got = combine_ensemble(SCORES, "mean_minus_std", k=2.0)
    assert got[0].item() == pytest.approx(3.0 - 2.0 * math.sqrt(14 / 3), abs=1e-12)
    assert got[1].item() == pytest.approx(1.0 - 2.0 * math.sqrt(2.0), abs=1e-12)
    # not the sample std (divide by K - 1 = 2): that would be 3 - 2 * sqrt(7)
    assert got[0].item() != pytest.approx(3.0 - 2.0 * math.sqrt(7.0), abs=1e-6)


def test_combine_mean_minus_var_is_coste_uwo():
    got = combine_ensemble(SCORES, "mean_minus_var", k=0.5)
    assert got.tolist() == pytest.approx([3.0 - 0.5 * 14 / 3, 1.0 - 0.5 * 2.0], abs=1e-12)


def test_combine_single_model_and_k_zero():
    one = torch.tensor([[0.5, -2.0]])
    for method in ("mean", "min", "mean_minus_std", "mean_minus_var"):
        assert combine_ensemble(one, method, k=3.0).tolist() == [0.5, -2.0]
    assert combine_ensemble(SCORES, "mean_minus_std", k=0.0).tolist() == [3.0, 1.0]


def test_combine_bad_input():
    with pytest.raises(ValueError, match="mean_minus_std"):
        combine_ensemble(SCORES, "median")
    with pytest.raises(ValueError, match=r"\[K >= 1 models, B samples\]"):
        combine_ensemble(torch.tensor([1.0, 2.0]), "mean")
    with pytest.raises(ValueError, match="k must be"):
        combine_ensemble(SCORES, "mean_minus_std", k=-1.0)


# ----- scoring -------------------------------------------------------------------------------------------------
def reference_scores(path: Path, pairs=TEXTS) -> list[float]:
    """One text at a time, no padding, straight through transformers (independent of the reward's batching)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for p, c in pairs:
            ids = torch.tensor([tok(p + c)["input_ids"]])
            out.append(model(input_ids=ids).logits[0, 0].item())
    return out


def test_seq_cls_batched_equals_one_by_one(rm_dirs):
    batch = make_batch()
    batched = RewardModelReward(RewardContext(), path=str(rm_dirs[0]), batch_size=4)
    single = RewardModelReward(RewardContext(), path=str(rm_dirs[0]), batch_size=1)
    got, one = values(batched(batch)), values(single(batch))
    assert got == pytest.approx(one, abs=1e-5)
    assert got == pytest.approx(reference_scores(rm_dirs[0]), abs=1e-5)
    assert max(got) - min(got) > 1e-3  # the scores do depend on the text


def test_value_head_format_batched_equals_one_by_one(value_rm_dir):
    assert (value_rm_dir / VALUE_HEAD_FILE).is_file()
    scorer = load_reward_model(str(value_rm_dir))
    assert scorer.kind == "value_head"
    batch = make_batch()
    got = values(RewardModelReward(RewardContext(), path=str(value_rm_dir), batch_size=3)(batch))
    one = values(RewardModelReward(RewardContext(), path=str(value_rm_dir), batch_size=1)(batch))
    assert got == pytest.approx(one, abs=1e-5)
    # independent check: head(hidden state of the last token) of each unpadded text
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(value_rm_dir)
    backbone = AutoModel.from_pretrained(value_rm_dir).eval()
    head = load_file(str(value_rm_dir / VALUE_HEAD_FILE))
    with torch.no_grad():
        for (p, c), g in zip(TEXTS, got):
            h = backbone(input_ids=torch.tensor([tok(p + c)["input_ids"]])).last_hidden_state[0, -1]
            assert g == pytest.approx((h @ head["weight"][0] + head["bias"][0]).item(), abs=1e-5)


def test_value_head_from_full_causal_lm_checkpoint(tiny_model_dir, tmp_path):
    """The value-head format also accepts a full causal-LM directory (its LM head is ignored)."""
    import shutil

    from safetensors.torch import save_file

    d = tmp_path / "policy_with_head"
    shutil.copytree(tiny_model_dir, d)
    from transformers import AutoConfig

    h = AutoConfig.from_pretrained(d).hidden_size
    save_file({"weight": torch.ones(1, h), "bias": torch.tensor([0.5])}, str(d / VALUE_HEAD_FILE))
    out = values(RewardModelReward(RewardContext(), path=str(d))(make_batch(TEXTS[:3])))
    assert len(out) == 3 and all(math.isfinite(v) for v in out[:2])
    # the head reads the backbone's last hidden state: ones . h + 0.5 (the LM head plays no part)
    from transformers import AutoModel, AutoTokenizer

    tok, backbone = AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d).eval()
    with torch.no_grad():
        for (p, c), g in zip(TEXTS[:2], out[:2]):
            hidden = backbone(input_ids=torch.tensor([tok(p + c)["input_ids"]])).last_hidden_state[0, -1]
            assert g == pytest.approx(float(hidden.sum()) + 0.5, abs=1e-4)
    bad = tmp_path / "bad_head"
    shutil.copytree(tiny_model_dir, bad)
    save_file({"weight": torch.ones(2, h)}, str(bad / VALUE_HEAD_FILE))
    with pytest.raises(ModelLoadError, match=r"must hold 'weight' \[1, 64\]"):
        load_reward_model(str(bad))


def test_ensemble_combinations_match_members(rm_dirs):
    batch = make_batch()
    members = torch.tensor([values(RewardModelReward(RewardContext(), path=str(d))(batch)) for d in rm_dirs],
                           dtype=torch.float64)
    rm = RewardModelReward(RewardContext(), paths=[str(d) for d in rm_dirs], batch_size=3)
    for combine, k in (("mean", 1.0), ("min", 1.0), ("mean_minus_std", 0.5), ("mean_minus_var", 2.0)):
        rm.combine, rm.k = combine, k  # the same loaded ensemble, combined another way
        out = rm(batch)
        expected = combine_ensemble(members, combine, k).tolist()
        assert values(out) == pytest.approx(expected, abs=1e-5)
        assert out[0].info["members"] == pytest.approx(members[:, 0].tolist(), abs=1e-5)
    mean = members.mean(0)
    std = members.std(0, unbiased=False)
    got = values(RewardModelReward(RewardContext(), paths=[str(d) for d in rm_dirs], combine="mean_minus_std",
                                   k=1.5, batch_size=8)(batch))
    assert got == pytest.approx((mean - 1.5 * std).tolist(), abs=1e-5)


def test_normalization_shift_and_scale(rm_dirs):
    batch = make_batch()
    raw = values(RewardModelReward(RewardContext(), path=str(rm_dirs[1]))(batch))
    norm = values(RewardModelReward(RewardContext(), path=str(rm_dirs[1]), shift=0.5, scale=4.0)(batch))
    assert norm == pytest.approx([(r - 0.5) / 4.0 for r in raw], abs=1e-6)
    members = [values(RewardModelReward(RewardContext(), path=str(d))(batch)) for d in rm_dirs[:2]]
    both = values(RewardModelReward(RewardContext(), paths=[str(d) for d in rm_dirs[:2]], shift=[1.0, -1.0],
                                    scale=[2.0, 0.5], combine="mean")(batch))
    expected = [((a - 1.0) / 2.0 + (b + 1.0) / 0.5) / 2 for a, b in zip(*members)]
    assert both == pytest.approx(expected, abs=1e-5)


def test_truncation_is_counted_and_keeps_the_end(rm_dirs):
    pairs = [("abcdefgh", "ijkl"), ("ab", "c"), ("0123456789", "")]
    rm = RewardModelReward(RewardContext(), path=str(rm_dirs[0]), max_length=6)
    out = rm(make_batch(pairs))
    assert [o.info["status"] for o in out] == ["truncated", "ok", "truncated"]
    assert rm.truncated == 2 and rm.scored == 3
    # left truncation keeps the last 6 characters: the same score as the text cut by hand
    kept = values(RewardModelReward(RewardContext(), path=str(rm_dirs[0]))(make_batch([("", "ghijkl"), ("ab", "c"),
                                                                                        ("", "456789")])))
    assert values(out) == pytest.approx(kept, abs=1e-5)
    right = RewardModelReward(RewardContext(), path=str(rm_dirs[0]), max_length=6, truncation_side="right")
    start = values(RewardModelReward(RewardContext(), path=str(rm_dirs[0]))(make_batch([("abcdef", "")])))
    assert values(right(make_batch(pairs[:1]))) == pytest.approx(start, abs=1e-5)


def test_pipeline_counts_truncations_and_empty_texts_fail(rm_dirs):
    spec = RewardSpec(name="reward_model", kwargs={"path": str(rm_dirs[0]), "max_length": 4})
    pipe = RewardPipeline([spec], context=RewardContext())
    res = pipe(["a long completion", "x", ""], [Sample(question="q", answer="")] * 3, prompts=["p", "p", ""])
    assert res.statuses[("reward_model", "truncated")] == 1
    assert res.failed["reward_model"] == [False, False, True]  # nothing to score: a counted failure
    assert res.errors[("reward_model", "InvalidValue")] == 1


def test_chat_template_and_template_fields(rm_dirs):
    batch = make_batch([("rendered prompt", " 5")])
    batch.samples[0] = Sample(question="what is 2+3?", answer="5")
    chat = values(RewardModelReward(RewardContext(), path=str(rm_dirs[0]), use_chat_template=True)(batch))
    by_hand = values(RewardModelReward(RewardContext(), path=str(rm_dirs[0]))(
        make_batch([("<|user|>what is 2+3?<|end|><|assistant|> 5<|end|>", "")])))
    assert chat == pytest.approx(by_hand, abs=1e-5)
    tmpl = values(RewardModelReward(RewardContext(), path=str(rm_dirs[0]), template="{question}={completion}")(batch))
    direct = values(RewardModelReward(RewardContext(), path=str(rm_dirs[0]))(make_batch([("what is 2+3?=", " 5")])))
    assert tmpl == pytest.approx(direct, abs=1e-5)


# ----- bad input -------------------------------------------------------------------------------------------------
def test_bad_paths_give_clear_errors(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="no-such-dir.*not a local directory"):
        RewardModelReward(RewardContext(), path=str(tmp_path / "no-such-dir"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="no config.json.*notes.txt"):
        RewardModelReward(RewardContext(), path=str(empty))
    with pytest.raises(ModelLoadError, match="no trained reward head"):
        RewardModelReward(RewardContext(), path=str(tiny_model_dir))  # a plain causal LM


def test_bad_model_and_options(tmp_path, rm_dirs):
    two = build_seq_cls_rm(tmp_path / "two_labels", seed=0, num_labels=2)
    with pytest.raises(ModelLoadError, match="num_labels=2"):
        load_reward_model(str(two))
    with pytest.raises(ValueError, match="exactly one of 'path'"):
        RewardModelReward(RewardContext())
    with pytest.raises(ValueError, match="exactly one of 'path'"):
        RewardModelReward(RewardContext(), path=str(rm_dirs[0]), paths=[str(rm_dirs[1])])
    with pytest.raises(ValueError, match="non-empty list"):
        RewardModelReward(RewardContext(), paths=[])
    with pytest.raises(ValueError, match="combine='best'"):
        RewardModelReward(RewardContext(), path=str(rm_dirs[0]), combine="best")
    with pytest.raises(ValueError, match="shift has 3 entries for 2 models"):
        RewardModelReward(RewardContext(), paths=[str(d) for d in rm_dirs[:2]], shift=[0, 0, 0])
    with pytest.raises(ValueError, match="scale must be non-zero"):
        RewardModelReward(RewardContext(), path=str(rm_dirs[0]), scale=0)
    with pytest.raises(ValueError, match="truncation_side"):
        RewardModelReward(RewardContext(), path=str(rm_dirs[0]), truncation_side="middle")
