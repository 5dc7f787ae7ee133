"""SFT: data formats and masking, the masked NLL against hand-worked numbers, packing equivalence, learning,
exact resume, bad input and the CLI. Tiny models only (no downloads)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import read_metrics
from safetensors.torch import load_file

from postrl.data.sft import (
    SFTExample,
    SFTStats,
    collate,
    collate_packed,
    pack,
    read_records,
    tokenize_record,
    tokenize_records,
)
from postrl.data.sources import DataError
from postrl.models.tiny import build_char_tokenizer
from postrl.run.checkpoint import latest_checkpoint
from postrl.trainer.sft import sft_loss, sft_token_nll, train_sft


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def toks(tok, ids, mask, trained: bool) -> str:
    """The text of the tokens whose mask equals ``trained``."""
    return "".join(tok.convert_ids_to_tokens([i for i, m in zip(ids, mask) if bool(m) == trained]))


# --------------------------------------------------------------------------------------------------------------
# formats and masking
# --------------------------------------------------------------------------------------------------------------


def test_messages_mask_only_assistant_tokens(tok):
    rec = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1?"},
                        {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4"}]}
    ids, mask, fmt = tokenize_record(tok, rec, "x")
    assert fmt == "conversational"
    assert "".join(tok.convert_ids_to_tokens(ids)) == tok.apply_chat_template(rec["messages"], tokenize=False)
    # only the two replies and their end-of-turn tokens are trained; system, user and the
    # generation prompt <|assistant|> are not
    assert toks(tok, ids, mask, True) == "2<|end|>4<|end|>"
    assert toks(tok, ids, mask, False) == ("<|system|>be brief<|end|><|user|>1+1?<|end|><|assistant|>"
                                           "<|user|>2+2?<|end|><|assistant|>")


def test_prompt_ids_match_rl_rendering(tok):
    """A chat example's prompt tokens are exactly what `postrl train` feeds the model for that prompt."""
    from postrl.data.prompts import render_prompt

    msgs = [{"role": "user", "content": "copy 3"}]
    ids, mask, _ = tokenize_record(tok, {"prompt": msgs, "completion": [{"role": "assistant", "content": "3"}]})
    n_prompt = mask.index(1)
    assert ids[:n_prompt] == render_prompt(tok, msgs)
    assert tok.convert_ids_to_tokens(ids[n_prompt:]) == ["3", "<|end|>"]


def test_standard_prompt_completion_and_text(tok):
    ids, mask, fmt = tokenize_record(tok, {"prompt": "ab", "completion": "cd"})
    assert fmt == "prompt_completion"
    assert tok.convert_ids_to_tokens(ids) == ["a", "b", "c", "d", "<|end|>"]  # no template; EOS appended
    assert mask == [0, 0, 1, 1, 1]
    ids, mask, fmt = tokenize_record(tok, {"text": "abc"})
    assert fmt == "text" and mask == [0, 1, 1, 1]  # every token but the first (nothing predicts it)


def test_conversation_without_chat_template():
    tok = build_char_tokenizer()
    tok.chat_template = None
    rec = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"}]}
    ids, mask, _ = tokenize_record(tok, rec, "x")
    from postrl.data.prompts import render_prompt

    assert ids[:mask.index(1)] == render_prompt(tok, rec["messages"][:2])  # plain rendering, as postrl train
    assert toks(tok, ids, mask, True) == "a<|end|>"
    multi = {"messages": rec["messages"] + [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(DataError, match="no chat template"):
        tokenize_record(tok, multi, "f.jsonl:3")


# --------------------------------------------------------------------------------------------------------------
# the loss, by hand
# --------------------------------------------------------------------------------------------------------------


def test_sft_loss_hand_computed():
    # V = 2, T = 3, ids = [0, 1, 0]. Position 0 predicts token 1 with logits [0, 0]: p = 1/2.
    # Position 1 predicts token 0 with logits [ln 3, 0]: p = 3 / (3 + 1) = 3/4. Position 2 predicts nothing.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [7.0, -7.0]]])
    ids = torch.tensor([[0, 1, 0]])
    only_last = torch.tensor([[0.0, 0.0, 1.0]])  # token 1 is a prompt token: its label is ignored
    assert float(sft_loss(logits, ids, only_last)) == pytest.approx(math.log(4 / 3), abs=1e-6)
    both = torch.tensor([[0.0, 1.0, 1.0]])
    assert float(sft_loss(logits, ids, both)) == pytest.approx((math.log(2) + math.log(4 / 3)) / 2, abs=1e-6)
    nll = sft_token_nll(logits, ids, only_last)
    assert nll.tolist()[0] == pytest.approx([0.0, 0.0, math.log(4 / 3)], abs=1e-6)
    # the normaliser of the whole mini batch (micro batches add up to the batch mean)
    assert float(sft_loss(logits, ids, both, num_tokens=4)) == pytest.approx((math.log(2) + math.log(4 / 3)) / 4)


def test_masked_positions_get_no_gradient(tiny_model_dir, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids, mask, _ = tokenize_record(tok, {"messages": [{"role": "user", "content": "copy 7"},
                                                      {"role": "assistant", "content": "7"}]})
    batch = collate([SFTExample(ids, mask)], tok.pad_token_id)
    logits = model(input_ids=batch["input_ids"]).logits.detach().requires_grad_(True)
    loss = sft_loss(logits, batch["input_ids"], batch["loss_mask"])
    loss.backward()
    predicts_target = torch.tensor(mask[1:] + [0], dtype=torch.bool)  # position t predicts token t+1
    assert logits.grad[0, ~predicts_target].abs().max() == 0
    assert logits.grad[0, predicts_target].abs().max() > 0
    # and the loss equals the hand-indexed mean NLL of the two target tokens ("7", "<|end|>")
    lp = torch.log_softmax(logits.detach()[0], -1)
    expected = -sum(float(lp[t - 1, ids[t]]) for t in range(len(ids)) if mask[t]) / sum(mask)
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------------------------


def test_pack_rows_in_order():
    ex = [SFTExample([1] * n, [0] + [1] * (n - 1), str(n)) for n in (3, 4, 2, 5, 1)]
    rows = pack(ex, 7)
    assert [[e.where for e in r] for r in rows] == [["3", "4"], ["2", "5"], ["1"]]
    with pytest.raises(ValueError, match="truncate"):
        pack([SFTExample([1] * 8, [1] * 8)], 7)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_unpacked(tiny_model_dir, tok, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    recs = [{"prompt": "copy 12", "completion": "12"}, {"text": "abc def"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    examples = [SFTExample(*tokenize_record(tok, r)[:2]) for r in recs]
    rows = pack(examples, 64)
    assert len(rows) == 1 and len(rows[0]) == 3  # all three share one row
    packed = collate_packed(rows + [[examples[1]]], tok.pad_token_id)  # + a padded second row
    with torch.no_grad():
        out = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                    position_ids=packed["position_ids"]).logits
        start = 0
        for e in examples:
            alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            assert torch.allclose(out[0, start:start + len(e)], alone, atol=1e-5, rtol=0)
            start += len(e)
        # the same loss, packed or not
        unpacked = collate(examples, tok.pad_token_id)
        u_logits = model(input_ids=unpacked["input_ids"], attention_mask=unpacked["attention_mask"]).logits
        n = float(unpacked["loss_mask"][:, 1:].sum())
        packed_loss = sft_loss(out[:1], packed["input_ids"][:1], packed["loss_mask"][:1], n)
        assert float(packed_loss) == pytest.approx(float(sft_loss(u_logits, unpacked["input_ids"],
                                                                  unpacked["loss_mask"], n)), abs=1e-5)
    assert packed["position_ids"][0].tolist()[:len(examples[0]) + 2] == list(range(len(examples[0]))) + [0, 1]


# --------------------------------------------------------------------------------------------------------------
# the loop: learning, resume, run directories
# --------------------------------------------------------------------------------------------------------------


SFT_FAST = ("sft.batch_size=16", "sft.micro_batch_size=16", "train.lr=3e-3", "run.threads=1", "sft.max_length=64")


@pytest.mark.parametrize("packing", [False, True])
def test_sft_drives_completion_loss_down(tiny_config, packing):
    cfg = tiny_config(*SFT_FAST, "sft.epochs=4", f"sft.packing={str(packing).lower()}", "eval.before=true",
                      "eval.after=true")
    run_dir, res = train_sft(cfg)
    before, after = res["eval_before"], res["eval_after"]
    # demonstrations from the copy task: the targets are the digit and <|end|>, 2 tokens per held-out example
    assert before["tokens"] == 2 * before["n"] == 40
    assert after["loss"] < 0.5 * before["loss"], (before, after)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, res["steps"] + 1))
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert res["data"]["train"]["examples"] == 180 and res["data"]["train"]["formats"] == {"conversational": 180}
    if packing:  # several examples per row: fewer, fuller rows
        assert res["data"]["train_rows"] < 180
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt.name == f"step_{res['steps']:06d}" and (ckpt / "config.json").is_file()
    assert json.loads((run_dir / "results.json").read_text())["eval_after"]["loss"] == after["loss"]


def test_sft_resume_is_exact(tiny_config):
    opts = (*SFT_FAST, "sft.epochs=2", "train.warmup_steps=3")
    straight, _ = train_sft(tiny_config(*opts, "run.name=straight"))
    split, res = train_sft(tiny_config(*opts, "sft.max_steps=5", "run.name=split"))
    assert res["steps"] == 5
    resumed, res2 = train_sft(tiny_config(*opts, "run.name=split"), resume=split)
    assert resumed == split and res2["steps"] == res2["total_steps"] == 24  # 2 epochs x ceil(180 / 16)
    a = load_file(str(latest_checkpoint(straight / "checkpoints") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(split / "checkpoints") / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    la, lb = read_metrics(straight), read_metrics(split)
    assert [r["step"] for r in lb] == list(range(1, 25))
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], abs=1e-6)


def test_new_sft_run_never_overwrites(tiny_config):
    first, _ = train_sft(tiny_config(*SFT_FAST, "sft.max_steps=1"))
    second, _ = train_sft(tiny_config(*SFT_FAST, "sft.max_steps=1"))
    assert second == first.with_name(first.name + "-2")


# --------------------------------------------------------------------------------------------------------------
# files, formats and bad input
# --------------------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("record, message", [
    ({"question": "a", "response": "b"}, r"f\.jsonl:2: not an SFT example .*'prompt' and 'completion'"),
    ({"prompt": "a"}, r"f\.jsonl:2: has 'prompt' but no 'completion'"),
    ({"prompt": "a", "completion": "  "}, r"f\.jsonl:2: empty completion"),
    ({"messages": [{"role": "user", "content": "a"}]}, r"f\.jsonl:2: 'messages' has no assistant message"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
     r"f\.jsonl:2: assistant message 1 is empty"),
    ({"messages": [{"role": "robot", "content": "a"}]}, r"f\.jsonl:2: messages\[0\] has role 'robot'"),
    ({"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}, r"both be strings or both"),
    ({"text": ""}, r"f\.jsonl:2: field 'text' must be a non-empty string"),
])
def test_bad_records_name_the_line(tmp_path, tok, record, message):
    path = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "ok", "completion": "ok"}, record])
    with pytest.raises(DataError, match=message):
        tokenize_records(tok, read_records(str(path)), 64)


def test_malformed_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        read_records(str(bad))
    with pytest.raises(DataError, match="not found"):
        read_records(str(tmp_path / "nope.jsonl"))


def test_too_long_examples_truncated_and_counted(tok):
    recs = [("a:1", {"prompt": "ab", "completion": "cdefgh"}),  # 2 + 7 tokens -> cut to 5, 3 trained left
            ("a:2", {"prompt": "abcdef", "completion": "g"}),   # the prompt fills max_length: dropped
            ("a:3", {"prompt": "a", "completion": "b"})]        # fits
    stats = SFTStats()
    out = tokenize_records(tok, recs, 5, stats)
    assert [e.where for e in out] == ["a:1", "a:3"]
    assert tok.convert_ids_to_tokens(out[0].input_ids) == ["a", "b", "c", "d", "e"]  # first max_length tokens
    assert out[0].loss_mask == [0, 0, 1, 1, 1]
    assert (stats.truncated, stats.dropped_too_long, stats.examples) == (2, 1, 2)


def test_parquet_and_datasets_sources(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert [r for _, r in read_records(str(tmp_path / "d.parquet"))] == rows
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "ds"))
    assert [r for _, r in read_records(str(tmp_path / "ds"), "test")] == rows[:1]
    with pytest.raises(DataError, match="no split 'validation'"):
        read_records(str(tmp_path / "ds"), "validation")


def test_cli_sft_from_file_and_bad_file(tiny_model_dir, tmp_path, capsys):
    from postrl.cli import main

    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"copy {d}", "completion": str(d)} for d in range(10)] * 3)
    common = [f"model.name_or_path={tiny_model_dir}", "sft.batch_size=8", "sft.micro_batch_size=8",
              "sft.eval_size=6", f"run.output_dir={tmp_path / 'runs'}", "run.progress=false", "run.threads=1"]
    assert main(["sft", f"sft.path={data}", *common]) == 0
    out = capsys.readouterr().out
    assert "trained 3 steps on 24 examples (0 truncated, 0 dropped as too long)" in out
    assert "held-out completion loss:" in out
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "completion": "y"}, {"prompt": "x"}])
    assert main(["sft", f"sft.path={bad}", *common]) == 2
    assert "bad.jsonl:2: has 'prompt' but no 'completion'" in capsys.readouterr().err
