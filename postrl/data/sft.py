"""Supervised fine-tuning data: records -> token ids with a loss mask -> (packed) batches.

Record formats (the ones TRL's ``SFTTrainer`` reads), detected per record:

============================  =====================================================  =========================
format                        fields                                                 trained tokens
============================  =====================================================  =========================
prompt-completion (standard)  ``prompt``: str, ``completion``: str                   the completion (+ EOS)
prompt-completion (chat)      ``prompt``: [messages], ``completion``: [messages]     the completion's assistant
                                                                                     messages (chat template)
conversational                ``messages``: [{"role", "content"}, ...]               every assistant message
language modeling             ``text``: str                                          every token (+ EOS)
============================  =====================================================  =========================

Standard (string) records are concatenated as ``prompt + completion`` without a template, as in TRL.
Conversational records go through the tokenizer's chat template, one segment at a time, so that the
prompt tokens are exactly what ``postrl train`` feeds the model (``render_prompt``) and the model's
reply is tokenized on its own, as when it is generated. Without a chat template, a conversation must
end with its only assistant message; the prompt is then rendered like :func:`postrl.data.prompts.render_plain`.

Truncation rule: an example longer than ``max_length`` tokens keeps its first ``max_length`` tokens
(the end of the completion is cut; TRL's ``keep_start``). An example left with no trained token is
dropped. Both are counted in :class:`SFTStats`.

Packing puts several examples into one row of up to ``max_length`` tokens, in order (a new row starts
when the next example does not fit). Each example keeps its own positions (``position_ids`` restart at
0) and a block-diagonal causal attention mask stops attention across examples, so the logits of a packed
example equal its unpacked logits.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from postrl.data.prompts import _to_id_list, has_chat_template, render_plain
from postrl.data.records import read_records as _read_records
from postrl.data.sources import DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class SFTExample:
    """One tokenized example: ``input_ids`` and ``loss_mask`` (1 where the token is a training target).

    ``loss_mask[0]`` is always 0: no position predicts the first token of an example.
    """

    input_ids: list[int]
    loss_mask: list[int]
    where: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class SFTStats:
    """Counts from tokenization: examples kept, truncated (cut to max_length) and dropped (nothing left)."""

    examples: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    formats: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "truncated": self.truncated, "dropped_too_long": self.dropped_too_long,
                "formats": dict(self.formats)}


# --------------------------------------------------------------------------------------------------
# reading records
# --------------------------------------------------------------------------------------------------


def read_records(path: str, split: str = "train") -> list[tuple[str, dict]]:
    """``(where, record)`` pairs of SFT data (see :func:`postrl.data.records.read_records`)."""
    return _read_records(path, split, "SFT data")


# --------------------------------------------------------------------------------------------------
# records -> segments (text, trained?) -> token ids
# --------------------------------------------------------------------------------------------------


def record_format(rec: Mapping, where: str = "") -> str:
    """``prompt_completion``, ``conversational`` or ``text``; a :class:`DataError` names what is missing."""
    if "messages" in rec:
        return "conversational"
    if "prompt" in rec or "completion" in rec:
        for key in ("prompt", "completion"):
            if key not in rec:
                raise DataError(f"{where}: has '{'prompt' if key == 'completion' else 'completion'}' but no "
                                f"{key!r} field (fields present: {sorted(rec)}); a prompt-completion example "
                                "needs both")
        return "prompt_completion"
    if "text" in rec:
        return "text"
    raise DataError(f"{where}: not an SFT example (fields present: {sorted(rec)}); expected 'prompt' and "
                    "'completion', or 'messages' (a list of {role, content}), or 'text'")


def _check_messages(msgs: Any, where: str, key: str) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: {key!r} must be a non-empty list of {{role, content}} messages, got "
                        f"{type(msgs).__name__ if not isinstance(msgs, list) else 'an empty list'}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: {key}[{i}] must be an object with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {key}[{i}] has role {m['role']!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: {key}[{i}].content must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _chat_segments(tokenizer, messages: list[dict], where: str) -> list[tuple[str, bool]]:
    """Split the chat-template rendering of ``messages`` into (text, is_assistant_reply) segments.

    Each assistant reply is the difference between the rendering of the conversation up to and including it
    and the rendering before it with the generation prompt (so the generation prompt stays in the prompt).
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False) if i else ""
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise DataError(f"{where}: the tokenizer's chat template does not render the conversation "
                            "incrementally (a later rendering does not start with an earlier one), so the "
                            "assistant tokens cannot be located; use prompt/completion strings instead")
        segments += [(prefix[len(done):], False), (full[len(prefix):], True)]
        done = full
    rest = tokenizer.apply_chat_template(messages, tokenize=False)
    if rest.startswith(done) and len(rest) > len(done):
        segments.append((rest[len(done):], False))
    return [(t, trained) for t, trained in segments if t]


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return _to_id_list(tokenizer(text, add_special_tokens=special)["input_ids"])


def tokenize_record(tokenizer, rec: Mapping, where: str = "") -> tuple[list[int], list[int], str]:
    """``(input_ids, loss_mask, format)`` of one record (see the module docstring for the formats).

    Raises :class:`DataError` for missing fields, wrong types and empty completions.
    """
    fmt = record_format(rec, where)
    eos = tokenizer.eos_token_id
    if fmt == "text":
        if not isinstance(rec["text"], str) or not rec["text"].strip():
            raise DataError(f"{where}: field 'text' must be a non-empty string")
        ids = _ids(tokenizer, rec["text"], True) + ([eos] if eos is not None else [])
        return ids, [0] + [1] * (len(ids) - 1), fmt
    if fmt == "prompt_completion":
        prompt, completion = rec["prompt"], rec["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            if not completion.strip():
                raise DataError(f"{where}: empty completion (nothing to train on); remove the example or fill it in")
            p_ids = _ids(tokenizer, prompt, True)
            c_ids = _ids(tokenizer, completion, False) + ([eos] if eos is not None else [])
            return p_ids + c_ids, [0] * len(p_ids) + [1] * len(c_ids), fmt
        if isinstance(prompt, str) or isinstance(completion, str):
            raise DataError(f"{where}: 'prompt' and 'completion' must both be strings or both be message lists, "
                            f"got {type(prompt).__name__} and {type(completion).__name__}")
        messages = _check_messages(prompt, where, "prompt") + _check_messages(completion, where, "completion")
        n_prompt = len(prompt)
        if not any(m["role"] == "assistant" for m in messages[n_prompt:]):
            raise DataError(f"{where}: 'completion' has no assistant message to train on")
        trained = [m["role"] == "assistant" and i >= n_prompt for i, m in enumerate(messages)]
    else:
        messages = _check_messages(rec["messages"], where, "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: 'messages' has no assistant message to train on (roles: "
                            f"{[m['role'] for m in messages]})")
        trained = [m["role"] == "assistant" for m in messages]
    for i, (m, t) in enumerate(zip(messages, trained)):
        if t and not m["content"].strip():
            raise DataError(f"{where}: assistant message {i} is empty (an empty completion); remove it or fill it in")
    return (*_conversation_ids(tokenizer, messages, trained, where), "conversational")


def _conversation_ids(tokenizer, messages: list[dict], trained_msg: list[bool],
                      where: str) -> tuple[list[int], list[int]]:
    """Token ids and loss mask of a conversation; ``trained_msg[i]`` says whether message i is a target."""
    if has_chat_template(tokenizer):
        ids: list[int] = []
        mask: list[int] = []
        # assistant messages that belong to the prompt are rendered but not trained
        segments = _chat_segments(tokenizer, messages, where)
        assistant_seen = 0
        for text, is_reply in segments:
            trained = False
            if is_reply:
                trained = [t for t, m in zip(trained_msg, messages) if m["role"] == "assistant"][assistant_seen]
                assistant_seen += 1
            seg = _ids(tokenizer, text, False)
            ids += seg
            mask += [int(trained)] * len(seg)
        if mask:
            mask[0] = 0
        return ids, mask
    last = len(messages) - 1
    if messages[last]["role"] != "assistant" or sum(trained_msg) != 1 or not trained_msg[last]:
        raise DataError(f"{where}: the tokenizer has no chat template, so a conversation must end with its only "
                        "trained assistant message (use prompt/completion strings for other shapes)")
    p_ids = _ids(tokenizer, render_plain(messages[:last]), True)
    eos = tokenizer.eos_token_id
    c_ids = _ids(tokenizer, messages[last]["content"], False) + ([eos] if eos is not None else [])
    return p_ids + c_ids, [0] * len(p_ids) + [1] * len(c_ids)


def truncate(ids: list[int], mask: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Keep the first ``max_length`` tokens (the documented truncation rule); returns (ids, mask, was_cut)."""
    if len(ids) <= max_length:
        return ids, mask, False
    return ids[:max_length], mask[:max_length], True


def tokenize_records(tokenizer, records: Sequence[tuple[str, Mapping]], max_length: int,
                     stats: Optional[SFTStats] = None) -> list[SFTExample]:
    """Tokenize, truncate (first ``max_length`` tokens) and drop examples with no trained token left; count both."""
    stats = stats if stats is not None else SFTStats()
    out = []
    for where, rec in records:
        ids, mask, fmt = tokenize_record(tokenizer, rec, where)
        stats.formats[fmt] = stats.formats.get(fmt, 0) + 1
        ids, mask, cut = truncate(ids, mask, max_length)
        stats.truncated += int(cut)
        if sum(mask) == 0:
            stats.dropped_too_long += 1
            continue
        out.append(SFTExample(ids, mask, where))
    stats.examples += len(out)
    if stats.truncated:
        log.warning("%d SFT examples were longer than sft.max_length=%d and were truncated (%d dropped: no "
                    "completion token left)", stats.truncated, max_length, stats.dropped_too_long)
    return out


def demonstrations_from_source(samples: Sequence[Any], system_prompt: Optional[str], prompt_template: str,
                               completion_template: str) -> list[tuple[str, dict]]:
    """Conversational records from prompt-source samples: the prompt as ``postrl train`` builds it, the
    reference answer (through ``completion_template``) as the assistant reply."""
    from postrl.data.prompts import build_messages

    return [(s.uid or f"sample {i}", {"messages": build_messages(s, system_prompt, prompt_template)
                                      + [{"role": "assistant", "content": completion_template.format(answer=s.answer)}]})
            for i, s in enumerate(samples)]


def split_records(records: list, eval_size: int, seed: int) -> tuple[list, list]:
    """Shuffle with ``seed`` and hold out the last ``min(eval_size, len // 2)`` records."""
    records = list(records)
    random.Random(seed).shuffle(records)
    n_eval = min(eval_size, len(records) // 2)
    return records[: len(records) - n_eval], records[len(records) - n_eval:]


# --------------------------------------------------------------------------------------------------
# collation and packing
# --------------------------------------------------------------------------------------------------


def collate(examples: Sequence[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``loss_mask`` tensors of shape [B, T]."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    loss = torch.zeros((len(examples), width), dtype=torch.float32)
    for i, e in enumerate(examples):
        n = len(e)
        ids[i, :n] = torch.tensor(e.input_ids)
        attn[i, :n] = 1
        loss[i, :n] = torch.tensor(e.loss_mask, dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def pack(examples: Sequence[SFTExample], max_length: int) -> list[list[SFTExample]]:
    """Group examples, in order, into rows of at most ``max_length`` tokens (a new row starts when the next
    example does not fit). Every example must be at most ``max_length`` long (see :func:`truncate`)."""
    rows: list[list[SFTExample]] = []
    used = max_length + 1
    for e in examples:
        if len(e) > max_length:
            raise ValueError(f"example {e.where} has {len(e)} tokens > max_length {max_length}; truncate it first")
        if used + len(e) > max_length:
            rows.append([])
            used = 0
        rows[-1].append(e)
        used += len(e)
    return rows


def collate_packed(rows: Sequence[Sequence[SFTExample]], pad_id: int,
                   dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Packed rows as ``input_ids``, ``loss_mask``, ``position_ids`` [B, T] and a 4D additive attention mask
    [B, 1, T, T] (0 = attend, dtype's min = blocked): causal within each example, nothing across examples.

    A float mask is used because transformers adds the 4D mask to the attention scores in its eager path
    (a boolean mask is only understood by the sdpa path). Padding positions attend to themselves only.
    """
    width = max(sum(len(e) for e in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    loss = torch.zeros((B, width), dtype=torch.float32)
    pos = torch.zeros((B, width), dtype=torch.long)
    seg = torch.full((B, width), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        start = 0
        for j, e in enumerate(row):
            n = len(e)
            ids[i, start:start + n] = torch.tensor(e.input_ids)
            loss[i, start:start + n] = torch.tensor(e.loss_mask, dtype=torch.float32)
            pos[i, start:start + n] = torch.arange(n)
            seg[i, start:start + n] = j
            start += n
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    allowed = causal & (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    allowed |= torch.eye(width, dtype=torch.bool)  # padding rows: attend to themselves (no NaN)
    mask = torch.zeros((B, 1, width, width), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return {"input_ids": ids, "loss_mask": loss, "position_ids": pos, "attention_mask": mask,
            "num_examples": torch.tensor([len(r) for r in rows])}
