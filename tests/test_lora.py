"""LoRA through PEFT (model.lora): config errors, only adapters train, the reference is the base model with the
adapter disabled, merged == unmerged, the layer maths by hand, exact resume, sft/dpo/rm, and learning.

All on the tiny random Llama of tests/conftest.py.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")

from conftest import read_metrics  # noqa: E402

from postrl.config import ConfigError, load_config  # noqa: E402
from postrl.models.logprobs import completion_logprobs  # noqa: E402
from postrl.models.loading import load_model_and_tokenizer  # noqa: E402
from postrl.models.lora import (  # noqa: E402
    ReferenceView,
    add_lora,
    is_adapter_dir,
    merged_state_dict,
    save_merged,
)
from postrl.run.checkpoint import latest_checkpoint  # noqa: E402
from postrl.trainer import train  # noqa: E402

TIME_KEYS = {"tokens_per_s", "gen_tokens_per_s", "step_time_s", "gen_time_s"}
LEARN = ("train.lr=1e-2", "rollout.n=4", "rollout.temperature=1.0", "run.threads=1")


def lora_cfg(**kw):
    return load_config(None, [f"model.lora.{k}={v}" for k, v in kw.items()]).model.lora


def batch_logprobs(model, seed: int = 0) -> torch.Tensor:
    """Log-probs of fixed random completions under ``model`` (eval mode, no gradient)."""
    g, V = torch.Generator().manual_seed(seed), model.config.vocab_size
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (5, 3, 7)]
    ids = torch.randint(3, V, (3, 4), generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    was = model.training
    model.eval()
    with torch.no_grad():
        lp, _ = completion_logprobs(model, prompts, ids, mask, 0)
    model.train(was)
    return lp


def perturb_adapters(model, seed: int = 1, scale: float = 0.3) -> None:
    """Give every adapter nonzero weights (B starts at 0, so a fresh adapter changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def load_tiny(path):
    return load_model_and_tokenizer(str(path), device="cpu")[0]


# --------------------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["model.lora.rank=-1"], "model.lora.rank=-1: must be >= 0"),
    (["model.lora.rank=8", "model.lora.alpha=0"], "model.lora.alpha=0.0: must be > 0"),
    (["model.lora.rank=8", "model.lora.dropout=1.0"], "model.lora.dropout=1.0: must be in [0, 1)"),
    (["model.lora.rank=8", "model.lora.target_modules=[]"], "model.lora.target_modules=[]: must name at least one"),
    (["model.lora.rank=8", "model.lora.target_modules=[all-linear, q_proj]"], "all-linear already means"),
    (["model.lora.alpha=16"], "model.lora.rank=0: turns LoRA off, so model.lora.alpha would be ignored"),
    (["model.lora.rank=8", "train.strategy=fsdp"], "fsdp is not supported with LoRA"),
    (["model.lora.rank=8", "algo.kl_coef=0.1", "algo.ref_reset_every=10"], "algo.ref_reset_every=10: must be 0 with"),
    (["model.lora.rank=1.5"], "model.lora.rank"),
    (["model.lora.bogus=1"], "bogus"),
])
def test_bad_lora_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_good_lora_configs_load():
    assert lora_cfg().rank == 0  # off by default
    c = lora_cfg(rank=1)
    assert (c.rank, c.alpha, c.dropout, c.target_modules) == (1, 32.0, 0.0, "all-linear")
    assert lora_cfg(rank=4, target_modules="[q_proj, v_proj]").target_modules == ["q_proj", "v_proj"]
    assert lora_cfg(rank=4, target_modules="q_proj").target_modules == "q_proj"


def test_target_modules_that_match_nothing_list_the_layers(tiny_model_dir):
    with pytest.raises(ConfigError) as err:
        add_lora(load_tiny(tiny_model_dir), lora_cfg(rank=2, target_modules="[query]"))
    msg = str(err.value)
    assert "model.lora.target_modules=['query'] matches no layer" in msg and "q_proj" in msg and "all-linear" in msg


# --------------------------------------------------------------------------------------------------------------
# the maths
# --------------------------------------------------------------------------------------------------------------


def test_lora_layer_output_by_hand(tiny_model_dir):
    r, alpha = 2, 3.0
    base = load_tiny(tiny_model_dir)
    W = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = add_lora(base, lora_cfg(rank=r, alpha=alpha))
    perturb_adapters(model)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(1.5)  # alpha / r
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()  # [r, in], [out, r]
    assert A.shape == (r, W.shape[1]) and B.shape == (W.shape[0], r)
    x = torch.randn(3, W.shape[1], generator=torch.Generator().manual_seed(5))
    by_hand = x @ W.T + (alpha / r) * (x @ A.T @ B.T)  # W x + (alpha / r) B A x, row-wise
    model.eval()
    with torch.no_grad():
        out = layer(x)
    assert torch.allclose(out, by_hand, atol=1e-6)
    # one number checked by hand: the first output of the first row
    x0 = x[0]
    lhs = float((W[0] * x0).sum() + 1.5 * sum(B[0, k] * (A[k] * x0).sum() for k in range(r)))
    assert float(out[0, 0]) == pytest.approx(lhs, abs=1e-5)


def test_only_adapter_parameters_train(tiny_config):
    from postrl.trainer.rl import RLTrainer

    job = RLTrainer(tiny_config("model.lora.rank=1", "algo.kl_coef=0.1"))
    try:
        trainable = [n for n, p in job.model.named_parameters() if p.requires_grad]
        # 2 layers x 7 linear layers (q, k, v, o, gate, up, down) x (A, B); the LM head and embeddings are frozen
        assert len(trainable) == 28 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
        optimized = {id(p) for g in job.optimizer.param_groups for p in g["params"]}
        assert optimized == {id(p) for p in job.model.parameters() if p.requires_grad}
        # the KL reference is the policy with its adapter disabled: no second copy of the weights
        assert isinstance(job.ref_model, ReferenceView) and job.ref_model.policy is job.model
    finally:
        job.close()


def test_reference_is_the_base_model(tiny_model_dir):
    before = batch_logprobs(load_tiny(tiny_model_dir))
    model = add_lora(load_tiny(tiny_model_dir), lora_cfg(rank=4))
    assert torch.equal(batch_logprobs(model), before)  # B = 0 at the start: the adapter changes nothing
    perturb_adapters(model)  # as after training
    assert (batch_logprobs(model) - before).abs().max() > 1e-2
    ref = ReferenceView(model)
    assert torch.allclose(batch_logprobs(ref), before, atol=1e-6, rtol=0)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    ref.eval().requires_grad_(False)  # what trainers do with a reference: the adapters must stay trainable
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_merged_and_unmerged_give_the_same_logprobs(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    model = add_lora(load_tiny(tiny_model_dir), lora_cfg(rank=4, alpha=8), base_name_or_path=str(tiny_model_dir))
    perturb_adapters(model)
    unmerged = batch_logprobs(model)
    sd = merged_state_dict(model)
    assert not any("lora" in k or "base_layer" in k for k in sd)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    merged_dir = save_merged(model, tok, tmp_path / "merged")
    merged = load_tiny(merged_dir)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert (batch_logprobs(merged) - unmerged).abs().max() < 1e-5
    # the adapter directory on its own (no merged/): base model + adapter, merged on loading
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    tok.save_pretrained(adapter_dir)
    assert is_adapter_dir(adapter_dir)
    assert (batch_logprobs(load_tiny(adapter_dir)) - unmerged).abs().max() < 1e-5
    assert (batch_logprobs(model) - unmerged).abs().max() == 0  # merging a copy left the policy as it was


def test_adapter_checkpoint_loads_back_exactly(tiny_model_dir, tmp_path):
    """What resume and the non-finite roll-back do with a LoRA checkpoint: the adapter back into a fresh model."""
    from postrl.run.checkpoint import load_weights

    model = add_lora(load_tiny(tiny_model_dir), lora_cfg(rank=2, target_modules="[q_proj, v_proj]"))
    perturb_adapters(model)
    model.save_pretrained(tmp_path / "ckpt")
    fresh = add_lora(load_tiny(tiny_model_dir), lora_cfg(rank=2, target_modules="[q_proj, v_proj]"))
    assert not torch.equal(batch_logprobs(fresh), batch_logprobs(model))
    load_weights(fresh, tmp_path / "ckpt")
    assert torch.equal(batch_logprobs(fresh), batch_logprobs(model))
    other = add_lora(load_tiny(tiny_model_dir), lora_cfg(rank=4, target_modules="[q_proj, v_proj]"))
    with pytest.raises((KeyError, RuntimeError)):  # another rank: refused, not silently half-loaded
        load_weights(other, tmp_path / "ckpt")


def test_quickstart_lora_recipe_is_the_quickstart_with_adapters():
    from postrl.commands.train import RECIPES
    from postrl.config import to_dict

    def flat(tree, prefix=""):
        out = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "task_kwargs" else {prefix + k: v})
        return out

    full, lora = (flat(to_dict(load_config(RECIPES / f"{n}.yaml"))) for n in ("quickstart", "quickstart_lora"))
    changed = {k for k in full if full[k] != lora[k]}
    assert changed == {"run.name", "train.lr", "model.lora.rank"}
    assert lora["model.lora.rank"] == 8 and lora["train.lr"] == pytest.approx(10 * full["train.lr"])
    assert "arXiv:2106.09685" in (RECIPES / "quickstart_lora.yaml").read_text()


# --------------------------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------------------------


def test_lora_rl_run_resumes_exactly_and_evaluates(tiny_config, tiny_model_dir):
    from postrl.eval.runner import resolve_model

    opts = (*LEARN, "model.lora.rank=2", "algo.kl_coef=0.1", "train.warmup_steps=4")
    straight, _ = train(tiny_config(*opts, "train.steps=6", "train.save_every=0", "run.name=straight"))
    split, res3 = train(tiny_config(*opts, "train.steps=3", "run.name=split"))
    assert res3["steps"] == 3
    resumed, res6 = train(tiny_config(*opts, "train.steps=6", "run.name=split"), resume=split)
    assert resumed == split and res6["steps"] == 6
    a, b = read_metrics(straight), read_metrics(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in TIME_KEYS} == {k: v for k, v in y.items() if k not in TIME_KEYS}
    assert any(r["kl_ref"] > 0 for r in a)  # the adapter moved the policy away from the reference

    # checkpoints and final/ hold the adapter (no full weights); final/merged/ is a plain model directory
    ckpt = latest_checkpoint(split / "checkpoints")
    assert is_adapter_dir(ckpt) and not (ckpt / "model.safetensors").exists()
    from safetensors.torch import load_file

    w_a = load_file(str(latest_checkpoint(straight / "checkpoints") / "adapter_model.safetensors"))
    w_b = load_file(str(ckpt / "adapter_model.safetensors"))
    assert set(w_a) == set(w_b) and all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    assert max(float(w.abs().max()) for k, w in w_a.items() if "lora_B" in k) > 1e-4  # training moved B
    final = split / "final"
    assert is_adapter_dir(final) and (final / "merged" / "config.json").is_file()
    cfg = json.loads((final / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["base_model_name_or_path"] == str(tiny_model_dir)

    # postrl eval --model RUN_DIR loads the latest checkpoint (base + adapter); final/ loads final/merged/
    path, run_dir = resolve_model(str(split))
    assert run_dir == split and path == str(ckpt)
    from_ckpt = batch_logprobs(load_tiny(path))
    from_final = batch_logprobs(load_tiny(final))
    base = batch_logprobs(load_tiny(tiny_model_dir))
    assert (from_ckpt - from_final).abs().max() < 1e-5
    assert (from_ckpt - base).abs().max() > 1e-4


def test_sft_dpo_rm_train_with_lora(tiny_config, tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from postrl.trainer.preference import train_dpo
    from postrl.trainer.reward_model import train_rm
    from postrl.trainer.sft import train_sft
    from tests.test_dpo import write_pairs

    lora = ("model.lora.rank=4", "train.lr=1e-2", "run.threads=1", "eval.before=true", "eval.after=true")
    sft_dir, res = train_sft(tiny_config(*lora, "sft.batch_size=16", "sft.micro_batch_size=16", "sft.max_length=64",
                                         "sft.max_steps=3", "run.name=sft"))
    assert res["steps"] == 3 and is_adapter_dir(sft_dir / "final") and (sft_dir / "final/merged/config.json").is_file()
    assert res["eval_after"]["loss"] < res["eval_before"]["loss"]

    pairs = write_pairs(tmp_path / "pairs.jsonl", 40)
    pref = (f"preference.path={pairs}", "preference.eval_size=8", "preference.batch_size=8",
            "preference.max_length=64", "preference.max_prompt_length=32")
    dpo_dir, res = train_dpo(tiny_config(*lora, *pref, "preference.beta=0.5", "run.name=dpo"))
    assert res["steps"] == 4 and is_adapter_dir(dpo_dir / "final")
    rows = read_metrics(dpo_dir)
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # reference = the base = the policy at the start
    assert rows[-1]["loss"] < rows[0]["loss"]
    # the cached reference log-probs are the base model's
    cache = torch.load(dpo_dir / "ref_logps.pt", weights_only=False)
    from postrl.trainer.preference import PreferenceTrainer, sequence_logps

    job = PreferenceTrainer(tiny_config(*lora, *pref, "run.name=dpo2"))
    base = load_tiny(tiny_model_dir).eval()
    items = job.data.train[:4]
    with torch.no_grad():
        lp, _ = sequence_logps(base, [x.prompt_ids for x in items], [x.chosen_ids for x in items], job.pad)
    assert torch.allclose(cache["train"]["chosen"][:4], lp, atol=1e-5)
    job.close()

    rm_dir, res = train_rm(tiny_config(*lora, *pref, "run.name=rm"))
    assert res["steps"] == 4 and is_adapter_dir(rm_dir / "final")
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir / "final" / "merged")
    assert type(rm).__name__ == "LlamaForSequenceClassification"
    # the score head trained with the adapter (modules_to_save) and is in the merged model
    from postrl.trainer.reward_model import RewardModelTrainer

    job = RewardModelTrainer(tiny_config(*lora, *pref, "run.name=rm"), latest_checkpoint(rm_dir / "checkpoints"))
    idx = list(range(4))
    job.model.eval()
    with torch.no_grad():
        rc, rr, _ = job.scores(idx, job.data.eval)
        rc2, rr2, _ = job.scores(idx, job.data.eval, rm.eval())
    assert torch.allclose(rc, rc2, atol=1e-5) and torch.allclose(rr, rr2, atol=1e-5)


@pytest.fixture(scope="module")
def scaled_tiny_dir(tmp_path_factory):
    """The tiny model with its final norm weight at 4 instead of 1. With the norm and the tied embeddings
    frozen (LoRA trains neither), the default tiny model's logits are capped at |h| |e| ~ 8 * 0.16 ~ 1.3, so no
    adapter can push p(correct digit) above ~7% of 51 tokens; a pre-trained model has no such cap."""
    from transformers import AutoModelForCausalLM

    from postrl.models.tiny import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("tiny_scaled") / "model", seed=0)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.norm.weight.fill_(4.0)
    model.save_pretrained(path)
    return path


def test_lora_rl_learns_the_toy_task(tiny_config, scaled_tiny_dir):
    """GRPO with rank-8 LoRA adapters only, on the copy task of the core tests: from chance to most prompts right.

    Measured (seed 0, last 10 steps): 0.76 at step 250, and a plateau near 0.75 up to step 400 (rank 32 too);
    full fine-tuning of the default tiny model reaches >= 0.9 in 150 steps (tests/test_methods.py), helped by
    training the tied embeddings and the norms, which the adapters leave frozen."""
    toy = ["rollout.n=8", "rollout.max_new_tokens=1", "train.prompts_per_step=16", "train.mini_batch_size=0",
           "train.micro_batch_size=128", "train.lr=1e-3", "train.steps=250", "run.seed=0", "run.threads=2",
           "model.lora.rank=8", f"model.name_or_path={scaled_tiny_dir}"]
    run_dir, _ = train(tiny_config(*toy))
    rows = read_metrics(run_dir)
    first = sum(r["reward_mean"] for r in rows[:5]) / 5
    last = sum(r["reward_mean"] for r in rows[-10:]) / 10
    print(f"LoRA r=8: mean reward first 5 steps {first:.3f}, last 10 steps {last:.3f}, {len(rows)} steps")
    assert first < 0.15 and last >= 0.6
