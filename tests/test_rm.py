"""postrl rm: the reward model learns a separable preference set, plugs in as an HF classifier, resumes."""

import json
import shutil

import pytest
import torch

from postrl.config import ConfigError, load_config
from postrl.trainer.reward_model import RewardModelTrainer, train_rm
from tests.conftest import read_metrics
from tests.test_dpo import write_pairs


@pytest.fixture(scope="module")
def rm_pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("rm") / "pairs.jsonl", 100, seed=3)


@pytest.fixture
def rm_config(tiny_model_dir, rm_pairs, tmp_path):
    def make(*overrides):
        base = [f"model.name_or_path={tiny_model_dir}", f"preference.path={rm_pairs}", "preference.eval_size=40",
                "preference.batch_size=8", "preference.max_length=64", "preference.max_prompt_length=32",
                "train.lr=1e-3", f"run.output_dir={tmp_path / 'runs'}", "run.name=rm", "run.progress=false"]
        return load_config(None, base + list(overrides))

    return make


def test_reward_model_learns_and_loads_as_classifier(rm_config):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir, res = train_rm(rm_config("preference.epochs=2"))
    assert res["eval_before"]["n"] == 40
    assert res["eval_after"]["accuracy"] >= 0.9
    assert res["eval_after"]["margin_mean"] > res["eval_before"]["margin_mean"]
    final = run_dir / "final"
    assert res["final_model"] == str(final)
    model = AutoModelForSequenceClassification.from_pretrained(final)  # what the reward_model reward does
    tok = AutoTokenizer.from_pretrained(final)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    # scores on texts as the trainer builds them: chat-templated prompt + completion + EOS
    good = tok.apply_chat_template([{"role": "user", "content": "q 5"}, {"role": "assistant", "content": "abca"}],
                                   tokenize=False)
    bad = tok.apply_chat_template([{"role": "user", "content": "q 5"}, {"role": "assistant", "content": "xyzv"}],
                                  tokenize=False)
    enc = tok([good, bad], return_tensors="pt", padding=True)
    with torch.no_grad():
        scores = model(**enc).logits[:, 0]
    assert scores[0] > scores[1]
    assert len(read_metrics(run_dir)) == res["steps"] == 16


def test_margin_field_is_used(rm_config, tmp_path):
    path = write_pairs(tmp_path / "m.jsonl", 12, margin=2.0)
    trainer = RewardModelTrainer(rm_config(f"preference.path={path}", "preference.eval_size=4"))
    rc, rr, margin = trainer.scores([0, 1], trainer.data.train)
    assert margin.tolist() == [2.0, 2.0]
    # a margin of 2 asks for r_c - r_r > 2: the Bradley-Terry loss with it is larger
    from postrl.algorithms.preference import bradley_terry_loss

    assert bradley_terry_loss(rc, rr, margin)[0].sum() > bradley_terry_loss(rc, rr)[0].sum()


def test_rm_resume_is_exact(rm_config, tmp_path):
    cfg = rm_config("preference.train_size=32", "preference.epochs=2", "train.save_every=3", "train.keep_checkpoints=0",
                    "eval.before=false")
    run_dir, res = train_rm(cfg)  # 8 updates
    part = tmp_path / "part"
    shutil.copytree(run_dir, part)
    for ckpt in (part / "checkpoints").iterdir():
        if ckpt.name != "step_000003":
            shutil.rmtree(ckpt)
    _, res2 = train_rm(cfg, resume=part)
    full, resumed = read_metrics(run_dir), read_metrics(part)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(full[3:], resumed[3:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)


def test_rm_refuses_unpaired_data_and_online(rm_config, tmp_path):
    path = tmp_path / "kto.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b", "label": True}) + "\n")
    with pytest.raises(ConfigError, match="needs chosen/rejected pairs"):
        train_rm(rm_config(f"preference.path={path}", "preference.eval_size=0"))
    with pytest.raises(ConfigError, match="postrl dpo, not postrl rm"):
        train_rm(rm_config("preference.online=true"))


def test_cli_rm(rm_config, rm_pairs, tiny_model_dir, tmp_path, capsys):
    from postrl.cli import main
    from postrl.commands.train import RECIPES

    assert main(["rm", str(RECIPES / "rm.yaml"), f"model.name_or_path={tiny_model_dir}", f"preference.path={rm_pairs}",
                 "preference.train_size=8", "preference.eval_size=8", "preference.batch_size=8",
                 "preference.micro_batch_size=8", "preference.max_length=64", "preference.max_prompt_length=32",
                 f"run.output_dir={tmp_path}", "run.progress=false"]) == 0
    out = capsys.readouterr().out
    assert "held-out pairwise accuracy" in out and "name: reward_model" in out
