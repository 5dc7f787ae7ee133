"""postrl dpo: equality with TRL, learning, cached reference log-probs, resume, online DPO, preference data."""

import json
import math
import random
import shutil
from collections import Counter

import pytest
import torch

from postrl.commands.train import RECIPES
from postrl.config import ConfigError, load_config
from postrl.data.pairs import (
    PreferencePair,
    load_records,
    parse_record,
    tokenize_pair,
    truncate,
)
from postrl.data.sources import DataError
from postrl.models.tiny import build_char_tokenizer, build_tiny_model
from postrl.trainer.preference import PreferenceTrainer, train_dpo
from tests.conftest import read_metrics


def write_pairs(path, n, seed=0, **extra):
    """Separable synthetic preferences: chosen completions use letters a-e, rejected ones v-z."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            c = "".join(rng.choice("abcde") for _ in range(rng.randint(2, 4)))
            r = "".join(rng.choice("vwxyz") for _ in range(rng.randint(2, 4)))
            f.write(json.dumps({"prompt": f"q {rng.randint(0, 99)}", "chosen": c, "rejected": r, **extra}) + "\n")
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", 100)


@pytest.fixture
def dpo_config(tiny_model_dir, pairs_file, tmp_path):
    def make(*overrides):
        base = [f"model.name_or_path={tiny_model_dir}", f"preference.path={pairs_file}", "preference.eval_size=40",
                "preference.batch_size=8", "preference.max_length=64", "preference.max_prompt_length=32",
                "train.lr=1e-3", "preference.beta=0.5", f"run.output_dir={tmp_path / 'runs'}", "run.name=d",
                "run.progress=false"]
        return load_config(None, base + list(overrides))

    return make


# ------------------------------------------------------------------------------------------------------------
# Equality with TRL
# ------------------------------------------------------------------------------------------------------------

TRL_ROWS = [
    {"prompt": [{"role": "user", "content": "q 1"}], "chosen": [{"role": "assistant", "content": "abc"}],
     "rejected": [{"role": "assistant", "content": "xy"}]},
    {"prompt": [{"role": "user", "content": "what is 2+2"}], "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "five"}]},
    {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello there"}],
     "rejected": [{"role": "assistant", "content": "go"}]},
    {"prompt": [{"role": "user", "content": "copy 7"}], "chosen": [{"role": "assistant", "content": "7"}],
     "rejected": [{"role": "assistant", "content": "8"}]},
]


def test_dpo_loss_equals_trl(tiny_model_dir, tmp_path):
    """First-batch DPO loss of postrl == TRL's DPOTrainer loss, same tiny policy, reference, data and beta.

    The reference is a second tiny model (different seed), so that the loss is not the trivial log 2 of a
    policy equal to its reference."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref_dir = build_tiny_model(tmp_path / "ref", seed=1)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, beta=0.1, report_to=[],
                         max_length=None, use_cpu=True, seed=0)
    trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(TRL_ROWS),
                             processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))  # the whole 4-pair data set
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, batch))

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TRL_ROWS))
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"preference.path={path}",
                             "preference.eval_size=0", "preference.batch_size=4", "preference.beta=0.1",
                             f"run.output_dir={tmp_path / 'runs'}", "run.progress=false", "model.dtype=float32"])
    ours = PreferenceTrainer(cfg)
    ref_logps = ours._ref_for(ref, ours.data.train, None)
    with torch.no_grad():
        losses, _ = ours.batch_loss(ours.data.train, ref_logps, [0, 1, 2, 3])
    assert abs(trl_loss - math.log(2)) > 1e-4  # a non-trivial value
    assert float(losses.mean()) == pytest.approx(trl_loss, abs=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Learning, reference cache, resume
# ------------------------------------------------------------------------------------------------------------


def test_dpo_learns_held_out_preferences(dpo_config, monkeypatch):
    calls = []
    orig = PreferenceTrainer._ref_for
    monkeypatch.setattr(PreferenceTrainer, "_ref_for", lambda self, *a: calls.append(1) or orig(self, *a))
    cfg = dpo_config("preference.epochs=2")
    run_dir, res = train_dpo(cfg)
    before, after = res["eval_before"], res["eval_after"]
    assert before["n"] == 40 and before["accuracy"] == 0.0 and before["margin_mean"] == 0.0  # policy == reference
    assert after["accuracy"] >= 0.9
    assert after["margin_mean"] > 0.5
    assert res["steps"] == 2 * 8  # 60 train pairs / 8 per update = 8 updates per epoch
    # the reference log-probs were computed once (train + held-out), not per epoch, and cached
    assert len(calls) == 2
    cache = torch.load(run_dir / "ref_logps.pt", weights_only=False)
    assert cache["train"]["chosen"].shape == (60,) and cache["eval"]["rejected"].shape == (40,)
    assert (run_dir / "final" / "config.json").is_file()
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert {"loss", "accuracy", "margins", "rewards/chosen", "rewards/rejected", "grad_norm"} <= set(rows[0])


def test_reference_free_loss_loads_no_reference(dpo_config, monkeypatch):
    monkeypatch.setattr(PreferenceTrainer, "_ref_for", lambda *a: pytest.fail("reference log-probs computed"))
    run_dir, res = train_dpo(dpo_config("preference.loss=simpo", "preference.beta=2.0", "preference.train_size=16",
                                        "eval.before=false"))
    assert not (run_dir / "ref_logps.pt").exists()
    assert res["steps"] == 2 and "accuracy" in res["eval_after"]


def test_resume_mid_epoch_is_exact(dpo_config, tmp_path):
    cfg = dpo_config("preference.train_size=40", "preference.epochs=2", "train.save_every=3",
                     "train.keep_checkpoints=0", "eval.before=false")
    run_dir, res = train_dpo(cfg)  # 5 updates per epoch, 10 in all
    full = read_metrics(run_dir)
    # a copy of the run as it was after update 6 (mid second epoch): later checkpoints and results removed
    part = tmp_path / "part"
    shutil.copytree(run_dir, part)
    for ckpt in (part / "checkpoints").iterdir():
        if ckpt.name != "step_000006":
            shutil.rmtree(ckpt)
    shutil.rmtree(part / "final")
    _, res2 = train_dpo(cfg, resume=part)
    resumed = read_metrics(part)
    assert [r["step"] for r in resumed] == list(range(1, 11))
    for a, b in zip(full[6:], resumed[6:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
    assert res2["eval_after"]["accuracy"] == pytest.approx(res["eval_after"]["accuracy"])


def test_kto_unpaired_and_on_pairs(dpo_config, tmp_path):
    rng = random.Random(1)
    path = tmp_path / "kto.jsonl"
    with open(path, "w") as f:
        for i in range(64):
            good = i % 2 == 0
            text = "".join(rng.choice("abcde" if good else "vwxyz") for _ in range(3))
            f.write(json.dumps({"prompt": f"q {i}", "completion": text, "label": good}) + "\n")
    _, res = train_dpo(dpo_config("preference.loss=kto", f"preference.path={path}", "preference.eval_size=16"))
    assert res["data"]["train"] == 48 and res["steps"] == 6
    # separable desirable (a-e) / undesirable (v-z) completions: KTO's implicit reward learns the split
    assert res["eval_before"]["accuracy"] < 0.5 and res["eval_after"]["accuracy"] >= 0.9
    # KTO on paired data: each pair becomes one desirable and one undesirable example
    _, res = train_dpo(dpo_config("preference.loss=kto", "preference.train_size=8", "preference.eval_size=8"))
    assert res["steps"] == 2  # 16 unpaired examples / 8


def test_paired_loss_on_unpaired_data_is_refused(dpo_config, tmp_path):
    path = tmp_path / "kto.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b", "label": True}) + "\n")
    with pytest.raises(ConfigError, match="needs chosen/rejected pairs"):
        train_dpo(dpo_config(f"preference.path={path}", "preference.eval_size=0"))


def test_config_errors():
    with pytest.raises(ConfigError, match="label_smoothing"):
        load_config(None, ["preference.label_smoothing=0.1"])  # dpo ignores label smoothing: refused
    with pytest.raises(ConfigError, match="max_prompt_length"):
        load_config(None, ["preference.max_length=16", "preference.max_prompt_length=16"])
    with pytest.raises(ConfigError, match="micro_batch_size=3 must divide"):
        load_config(None, ["preference.batch_size=8", "preference.micro_batch_size=3"])
    load_config(None, ["preference.loss=cdpo", "preference.label_smoothing=0.1"])


def test_unknown_loss_name(dpo_config):
    with pytest.raises(ConfigError, match="Did you mean 'orpo'"):
        train_dpo(dpo_config("preference.loss=orp"))


# ------------------------------------------------------------------------------------------------------------
# Online / iterative DPO
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("selection", ["best_worst", "rso"])
def test_online_dpo_rounds(tiny_config, selection):
    cfg = tiny_config("preference.online=true", "preference.rounds=2", "preference.prompts_per_round=8",
                      "rollout.n=4", "rollout.max_new_tokens=3", "preference.batch_size=4",
                      f"preference.pair_selection={selection}", "preference.beta=0.5", "eval.after=true",
                      "data.eval_size=8")
    run_dir, res = train_dpo(cfg)
    rounds = res["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:  # every prompt gives a pair or is skipped as a tie
        assert r["pairs"] + r["groups_skipped_tie"] == 8
    assert sum(r["pairs"] for r in rounds) > 0
    rows = read_metrics(run_dir)
    assert len(rows) == res["steps"] == sum(-(-r["pairs"] // 4) for r in rounds)
    assert {r["round"] for r in rows} <= {1, 2}
    assert "accuracy" in res["eval_after"]  # greedy task accuracy on held-out prompts


def test_online_dpo_schedule_keeps_its_place_when_prompts_tie(tiny_config):
    """The LR schedule is planned over rounds x ceil(prompts_per_round / batch_size) updates; a round whose
    prompts tie gives fewer updates, and the schedule moves on by the missing ones at the round's end, so that
    round 2 starts at the planned position and a cosine schedule reaches its end."""
    from postrl.run.optim import lr_lambda

    cfg = tiny_config("preference.online=true", "preference.rounds=3", "preference.prompts_per_round=8",
                      "rollout.n=4", "rollout.max_new_tokens=1", "preference.batch_size=2", "preference.beta=0.5",
                      "train.lr_schedule=cosine", "train.lr=1e-3",
                      "rewards=[{name: regex, kwargs: {pattern: '[0-9a-m]'}}]")  # ~1/3 of the tokens: some ties
    run_dir, res = train_dpo(cfg)
    rounds, rows = res["rounds"], read_metrics(run_dir)
    planned = 4  # ceil(8 / 2) updates per round
    assert any(-(-r["pairs"] // 2) < planned for r in rounds[:2])  # ties: a round before the last had fewer updates
    assert len(rows) < 3 * planned
    lam = lr_lambda("cosine", 0, 3 * planned)
    for r in rows:
        k = r["step"] - 1 - sum(-(-x["pairs"] // 2) for x in rounds[:r["round"] - 1])  # update k of its round
        assert r["lr"] == pytest.approx(1e-3 * lam((r["round"] - 1) * planned + k), rel=1e-6)


def test_online_kto_refused(tiny_config):
    with pytest.raises(ConfigError, match="kto"):
        train_dpo(tiny_config("preference.online=true", "preference.loss=kto"))


# ------------------------------------------------------------------------------------------------------------
# Preference data: formats and bad input
# ------------------------------------------------------------------------------------------------------------


def test_missing_field_names_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
                    + json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    where, rec = load_records(str(path))[1]
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing field 'rejected'"):
        parse_record(rec, where, Counter())
    with pytest.raises(DataError, match=r"x:7: missing field 'prompt'"):
        parse_record({"chosen": "a", "rejected": "b"}, "x:7", Counter())
    with pytest.raises(DataError, match=r"x:3: missing field 'label'"):
        parse_record({"prompt": "a", "completion": "b"}, "x:3", Counter())
    with pytest.raises(DataError, match=r"x:4: missing fields: expected 'prompt'/'chosen'/'rejected'"):
        parse_record({"question": "a"}, "x:4", Counter())
    with pytest.raises(DataError, match=r"x:5: field 'chosen' must be a string or a list"):
        parse_record({"prompt": "a", "chosen": 3, "rejected": "b"}, "x:5", Counter())


def test_identical_and_empty_pairs_are_skipped_and_counted(dpo_config, tmp_path):
    path = write_pairs(tmp_path / "p.jsonl", 20)
    with open(path, "a") as f:
        f.write(json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}) + "\n")
        f.write(json.dumps({"prompt": "p", "chosen": "  ", "rejected": "b"}) + "\n")
        f.write(json.dumps({"prompt": "p", "chosen": "a", "rejected": ""}) + "\n")
    _, res = train_dpo(dpo_config(f"preference.path={path}", "preference.eval_size=4", "preference.epochs=1"))
    assert res["data"]["skipped_chosen_equals_rejected"] == 1
    assert res["data"]["skipped_empty_completion"] == 2
    assert res["data"]["train"] + res["data"]["eval"] == 20


def test_all_pairs_bad_is_an_error(dpo_config, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "x", "rejected": "x"}) + "\n")
    with pytest.raises(DataError, match="no usable training examples.*skipped_chosen_equals_rejected"):
        train_dpo(dpo_config(f"preference.path={path}", "preference.eval_size=0"))


def test_truncation_rule():
    # prompt of 6, completions of 5 and 3, max_length 8, max_prompt_length 4:
    # the prompt keeps its last 4 tokens, then completions are cut from the right to 8 - 4 = 4 tokens.
    p, (c, r), cut_p, cut_c = truncate([1, 2, 3, 4, 5, 6], [[7, 8, 9, 10, 11], [12, 13, 14]], 8, 4)
    assert p == [3, 4, 5, 6] and c == [7, 8, 9, 10] and r == [12, 13, 14] and cut_p and cut_c
    # fits: nothing changes, even with a prompt longer than max_prompt_length
    assert truncate([1, 2, 3, 4, 5], [[6]], 8, 4) == ([1, 2, 3, 4, 5], [[6]], False, False)
    # only the prompt needs cutting
    assert truncate([1, 2, 3, 4, 5, 6], [[7, 8]], 7, 4) == ([3, 4, 5, 6], [[7, 8]], True, False)


def test_truncation_is_counted(dpo_config, tmp_path):
    path = tmp_path / "long.jsonl"
    with open(path, "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": "p" * 40, "chosen": "a" * (30 + i), "rejected": "b" * 5}) + "\n")
    _, res = train_dpo(dpo_config(f"preference.path={path}", "preference.eval_size=0", "preference.max_length=32",
                                  "preference.max_prompt_length=16", "preference.chat_template=false"))
    assert res["data"]["truncated_prompt"] == 8 and res["data"]["truncated_completion"] == 8


def test_tokenization_formats():
    tok = build_char_tokenizer()
    eos = tok.eos_token_id
    counts = Counter()
    # plain strings without the chat template: prompt tokens, then completion + EOS (as TRL)
    t = tokenize_pair(tok, PreferencePair("ab", "c", "d"), 64, 32, counts, chat_template=False)
    assert tok.decode(t.prompt_ids) == "ab" and t.chosen_ids[-1] == eos and tok.decode(t.chosen_ids[:-1]) == "c"
    # plain strings with the chat template == the conversational form
    t1 = tokenize_pair(tok, PreferencePair("ab", "c", "d"), 64, 32, counts)
    t2 = tokenize_pair(tok, PreferencePair([{"role": "user", "content": "ab"}],
                                           [{"role": "assistant", "content": "c"}],
                                           [{"role": "assistant", "content": "d"}]), 64, 32, counts)
    assert (t1.prompt_ids, t1.chosen_ids, t1.rejected_ids) == (t2.prompt_ids, t2.chosen_ids, t2.rejected_ids)
    assert tok.decode(t1.prompt_ids, skip_special_tokens=False) == "<|user|>ab<|end|><|assistant|>"
    assert tok.decode(t1.chosen_ids, skip_special_tokens=False) == "c<|end|>"
    # implicit prompt: the shared leading messages
    conv = [{"role": "user", "content": "ab"}]
    pair = parse_record({"chosen": conv + [{"role": "assistant", "content": "c"}],
                         "rejected": conv + [{"role": "assistant", "content": "d"}]}, "x:1", counts)
    assert pair.prompt == conv and pair.chosen == [{"role": "assistant", "content": "c"}]
    assert not +counts  # nothing skipped or truncated


def test_parquet_and_datasets_directory(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "c", "rejected": "d"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    recs = load_records(str(tmp_path / "p.parquet"))
    assert [w for w, _ in recs] == [f"{tmp_path / 'p.parquet'} row 0", f"{tmp_path / 'p.parquet'} row 1"]
    assert recs[1][1] == rows[1]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "ds"))
    assert [r for _, r in load_records(str(tmp_path / "ds"), "train")] == rows
    with pytest.raises(DataError, match="no split 'test'"):
        load_records(str(tmp_path / "ds"), "test")


def test_cli_dpo(dpo_config, pairs_file, tiny_model_dir, tmp_path, capsys):
    from postrl.cli import main

    args = ["dpo", str(RECIPES / "dpo.yaml"), f"model.name_or_path={tiny_model_dir}",
            f"preference.path={pairs_file}", "preference.train_size=8", "preference.eval_size=8",
            "preference.max_length=64", "preference.max_prompt_length=32", f"run.output_dir={tmp_path}",
            "run.progress=false"]
    assert main(args) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    assert main(args[:2] + [f"model.name_or_path={tiny_model_dir}", f"preference.path={bad}",
                            f"run.output_dir={tmp_path}"]) == 2
    assert "bad.jsonl:1: missing field 'rejected'" in capsys.readouterr().err
