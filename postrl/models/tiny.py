"""Tiny models for tests and smoke runs: a small Llama with a character-level tokenizer.

Built locally from a config (no downloads) and saved with ``save_pretrained``,
so it goes through exactly the same loading path as a hub model.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer(chars: str = string.digits + string.ascii_lowercase + " +-=?.:,\n"):
    """A character-level ``PreTrainedTokenizerFast`` with a chat template and ``<|end|>`` as EOS."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  eos_token="<|end|>", additional_special_tokens=SPECIAL_TOKENS[2:])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_model(path: str | Path, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                     num_heads: int = 4, chars: str | None = None) -> Path:
    """Write a randomly initialised tiny Llama + char tokenizer to ``path``; return the path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_char_tokenizer() if chars is None else build_char_tokenizer(chars)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
