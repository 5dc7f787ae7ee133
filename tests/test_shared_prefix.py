"""The update's shared-prefix forward (postrl.models.logprobs): a prompt that several rows share runs once, and
the log-probs, entropies, values and gradients equal the unshared forward's."""

from __future__ import annotations

import pytest
import torch

from conftest import update_grads
from postrl.models.loading import load_model_and_tokenizer
from postrl.models.logprobs import (
    _NO_SHARING,
    _copy_rows,
    completion_logprobs,
    completion_logprobs_and_values,
    distinct_prompts,
    prompt_groups,
)
from postrl.trainer.rl import RLTrainer, grouped_length_order, micro_batch_tokens

# prompts of different lengths (left padding), each shared by 2-3 rows in a mixed order
PROMPTS = [[5, 6, 7], [5, 6, 7], [8, 9], [5, 6, 7], [8, 9], [3, 4, 5, 6, 7], [3, 4, 5, 6, 7]]


@pytest.fixture
def tiny(tiny_model_dir):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir), dtype="float32", device="cpu")[:2]
    return model, tok


def _completions(vocab: int, width: int = 5):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (len(PROMPTS), width), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0  # right padding: completions of different lengths
    mask[4, 1:] = 0
    return ids, mask


def _grads(module_list) -> list[torch.Tensor]:
    return [p.grad.clone() for m in module_list for p in m.parameters()]


def _assert_close_grads(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    scale = max(float(g.abs().max()) for g in a)
    assert scale > 0
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-5 * scale, rtol=1e-5)


def test_distinct_prompts_and_groups():
    unique, inverse = distinct_prompts(PROMPTS)
    assert unique == [[5, 6, 7], [8, 9], [3, 4, 5, 6, 7]]
    assert inverse.tolist() == [0, 0, 1, 0, 1, 2, 2]
    assert prompt_groups([[1], [2], [3]]) is None  # nothing shared: the plain forward


@pytest.mark.parametrize("width", [5, 1])  # width 1: the prompts' own pass gives every log-prob
def test_shared_prefix_logprobs_entropy_and_gradients_equal_the_plain_forward(tiny, width):
    model, tok = tiny
    ids, mask = _completions(model.config.vocab_size, width)
    out = {}
    for share in (False, True):
        model.zero_grad()
        lp, ent = completion_logprobs(model, PROMPTS, ids, mask, tok.pad_token_id, 0.7, with_entropy=True,
                                      entropy_grad=True, share_prefix=share)
        (lp.sum() + 0.5 * ent.sum()).backward()
        out[share] = lp.detach(), ent.detach(), _grads([model])
    assert torch.allclose(out[True][0], out[False][0], atol=1e-5)
    assert torch.allclose(out[True][1], out[False][1], atol=1e-5)
    assert (out[True][0][mask == 0] == 0).all()  # padding positions hold 0 as in the plain forward
    _assert_close_grads(out[False][2], out[True][2])


def test_shared_prefix_runs_each_distinct_prompt_once(tiny):
    model, tok = tiny
    ids, mask = _completions(model.config.vocab_size)
    shapes, head_positions = [], []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    head_hook = model.get_output_embeddings().register_forward_pre_hook(
        lambda m, args: head_positions.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            completion_logprobs(model, PROMPTS, ids, mask, tok.pad_token_id)
    finally:
        hook.remove()
        head_hook.remove()
    # the 3 distinct prompts (longest 5 tokens), then the 7 completions of width 5 on the copied cache
    assert shapes == [(3, 5), (7, 5)]
    # the LM head sees only the prompts' last positions (lengths 3, 2, 5: 3 distinct), then the completions
    assert head_positions == [3, 5]


def test_shared_prefix_values_and_gradients_equal_the_plain_forward(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    head = torch.nn.Linear(model.config.hidden_size, 1)
    ids, mask = _completions(model.config.vocab_size)
    out = {}
    for share in (False, True):
        model.zero_grad()
        head.zero_grad()
        lp, _, values = completion_logprobs_and_values(model, head, PROMPTS, ids, mask, tok.pad_token_id,
                                                       share_prefix=share)
        (lp.sum() + values.pow(2).sum()).backward()
        out[share] = lp.detach(), values.detach(), _grads([model, head])
    assert torch.allclose(out[True][0], out[False][0], atol=1e-5)
    assert torch.allclose(out[True][1], out[False][1], atol=1e-5)
    _assert_close_grads(out[False][2], out[True][2])


def test_a_model_without_a_shareable_cache_falls_back_to_the_plain_forward(tiny):
    """Gradient checkpointing switches transformers' cache off in training mode: the forward is the plain one."""
    model, tok = tiny
    ids, mask = _completions(model.config.vocab_size)
    with torch.no_grad():
        want, _ = completion_logprobs(model, PROMPTS, ids, mask, tok.pad_token_id, share_prefix=False)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    enable()
    model.train()
    try:
        got, _ = completion_logprobs(model, PROMPTS, ids, mask, tok.pad_token_id)
        assert model in _NO_SHARING  # remembered: later calls go straight to the plain forward
        assert torch.allclose(got.detach(), want, atol=1e-5)
    finally:
        disable()
        _NO_SHARING.discard(model)


def test_grouped_length_order_by_hand():
    # groups 0: rows 0 (len 5), 3 (len 2); 1: rows 1 (len 9), 4 (len 1); 2: row 2 (len 4)
    groups, lengths = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([5, 9, 4, 2, 1])
    # group maxima 5, 9, 4 -> groups in the order 2, 0, 1; rows by length inside each group
    assert grouped_length_order(groups, lengths).tolist() == [2, 3, 0, 4, 1]
    with pytest.raises(ValueError, match="two 1-D tensors of one shape"):
        grouped_length_order(torch.tensor([0, 1]), torch.tensor([1, 2, 3]))


def test_copy_rows_by_hand_and_its_gradient_sums_the_copies():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    copies = torch.nn.functional.one_hot(torch.tensor([1, 0, 1]), 2).float()
    out = _copy_rows(x, copies)
    assert out.tolist() == [[3.0, 4.0], [1.0, 2.0], [3.0, 4.0]]
    (out * torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])).sum().backward()
    assert x.grad.tolist() == [[2.0, 2.0], [4.0, 4.0]]  # row 1 gets the gradients of copies 0 and 2: 1 + 3


def test_micro_batch_tokens_by_hand():
    """The update picks the row order (by group, or by length) whose micro batches compute fewer positions."""
    groups, prompt_lens = torch.tensor([0, 0, 1, 1]), torch.tensor([10, 10, 4, 4])
    completion_lens = torch.tensor([1, 9, 1, 9])
    # by group, micro batches of 2: {0, 1}: one prompt of 10 + 2 rows x 9 = 28; {2, 3}: 4 + 2 x 9 = 22
    assert micro_batch_tokens(torch.tensor([0, 1, 2, 3]), groups, prompt_lens, completion_lens, 2) == 50
    # {0, 2}: two prompts padded to 10 + 2 x 1 = 22; {1, 3}: 2 x 10 + 2 x 9 = 38
    assert micro_batch_tokens(torch.tensor([0, 2, 1, 3]), groups, prompt_lens, completion_lens, 2) == 60
    assert micro_batch_tokens(torch.tensor([0, 2, 1, 3]), groups, prompt_lens, completion_lens, 4) == 2 * 10 + 4 * 9


@pytest.mark.parametrize("extra", [[], ["algo.kl_coef=0.1"]])  # with KL: the reference model's forward shares too
def test_update_with_the_shared_prefix_gives_the_same_gradient(tiny_config, extra):
    cfg = tiny_config("rollout.max_new_tokens=6", "train.micro_batch_size=6", "rollout.temperature=1.5",
                      "rollout.n=4", "train.prompts_per_step=3", *extra)
    trainer = RLTrainer(cfg)
    trainer.skip_zero_advantage = False
    batch = trainer.rollout(0)
    batch.rewards = torch.tensor([float(i % 3) for i in range(len(batch))], dtype=torch.float64)
    shared = update_grads(trainer, batch, share_prefix=True)
    plain = update_grads(trainer, batch, share_prefix=False)
    assert shared and len(shared) == len(plain)
    _assert_close_grads(plain, shared)
    trainer.close()
