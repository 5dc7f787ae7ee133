"""Preference data for ``postrl dpo`` and ``postrl rm``: loading, validation, tokenization, truncation.

Record formats (the ones TRL users already have):

* **paired, standard**: ``{"prompt": str, "chosen": str, "rejected": str}``;
* **paired, conversational**: ``prompt`` a list of ``{"role", "content"}`` messages, ``chosen`` /
  ``rejected`` lists of (assistant) messages;
* **paired, implicit prompt**: only ``chosen`` / ``rejected``, each a whole conversation; the longest
  common prefix of messages is the prompt, the rest the completions;
* **unpaired (KTO)**: ``{"prompt", "completion", "label": bool}`` (standard or conversational).

An optional numeric ``margin`` field is used by ``postrl rm`` (Llama 2 margin). Files: ``.jsonl``,
``.parquet`` (pyarrow), a ``datasets`` directory written by ``save_to_disk`` (or a directory/file of data
files ``datasets`` can read: .json, .csv, .parquet), or a hub dataset name (only when the hub answers).

Tokenization: conversational records, and standard ones when the tokenizer has a chat template and
``chat_template`` is on, go through ``tokenizer.apply_chat_template``: prompt ids with the generation
prompt, completion ids = the tokens of ``prompt + completion`` after their common prefix with the prompt
(as TRL does). Standard records without a chat template: ``tokenizer(prompt)`` and
``tokenizer(prompt + completion)``, with EOS appended to the completion when it does not end with it.

Bad input: a missing or mistyped field raises :class:`DataError` naming the file, line/row and field.
Pairs whose chosen equals rejected and records with an empty completion are skipped and counted;
too-long sequences are truncated by :func:`truncate` (the rule is in its docstring) and counted. The
counts go into the run's results (``data`` key) and one warning.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .prompts import _to_id_list, build_messages, has_chat_template, render_plain
from .records import read_records
from .sources import DataError

log = logging.getLogger(__name__)

Text = str | list[dict]  # a string or a list of chat messages


@dataclass
class PreferencePair:
    prompt: Text
    chosen: Text
    rejected: Text
    margin: float | None = None
    where: str = ""


@dataclass
class UnpairedExample:
    prompt: Text
    completion: Text
    desirable: bool
    where: str = ""


@dataclass
class TokenizedPair:
    """Token ids of one pair; completions end with EOS unless truncated."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float = 0.0
    where: str = ""


@dataclass
class TokenizedExample:
    """Token ids of one unpaired (KTO) example."""

    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    where: str = ""


@dataclass
class PreferenceData:
    """Tokenized train / held-out sets; ``counts`` has the skipped / truncated counts."""

    train: list[Any]
    eval: list[Any]
    counts: Counter = field(default_factory=Counter)


# ------------------------------------------------------------------------------------------------------------
# Reading records
# ------------------------------------------------------------------------------------------------------------


def load_records(path: str, split: str = "train") -> list[tuple[str, dict]]:
    """``(location, record)`` pairs of preference data (see :func:`postrl.data.records.read_records`)."""
    return read_records(path, split, "preference data")


# ------------------------------------------------------------------------------------------------------------
# Validating records
# ------------------------------------------------------------------------------------------------------------


def _is_messages(x: Any) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(isinstance(m, dict) and "role" in m and "content" in m
                                                       for m in x)


def _check_text(x: Any, where: str, name: str) -> Text:
    if isinstance(x, str) or _is_messages(x):
        return x
    if isinstance(x, list) and not x:
        return x  # an empty conversation: counted as an empty completion
    raise DataError(f"{where}: field {name!r} must be a string or a list of {{'role', 'content'}} messages, "
                    f"got {type(x).__name__}: {str(x)[:80]!r}")


def _is_empty(x: Text) -> bool:
    if isinstance(x, str):
        return not x.strip()
    return not x or all(not str(m.get("content", "")).strip() for m in x)


def _split_implicit(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    return chosen[:k], chosen[k:], rejected[k:]


def parse_record(rec: dict, where: str, counts: Counter) -> PreferencePair | UnpairedExample | None:
    """One record -> a pair or an unpaired example; None (and ``counts`` updated) when it is skipped.

    Raises :class:`DataError` naming ``where`` and the field for missing or mistyped fields."""
    if "chosen" in rec or "rejected" in rec:
        for key in ("chosen", "rejected"):
            if key not in rec or rec[key] is None:
                raise DataError(f"{where}: missing field {key!r} (a pair needs 'chosen' and 'rejected'; "
                                f"fields present: {sorted(rec)})")
        chosen, rejected = _check_text(rec["chosen"], where, "chosen"), _check_text(rec["rejected"], where, "rejected")
        if rec.get("prompt") is None:
            if not (_is_messages(chosen) and _is_messages(rejected)):
                raise DataError(f"{where}: missing field 'prompt' (only conversational pairs may leave the prompt "
                                f"implicit in 'chosen'/'rejected'; fields present: {sorted(rec)})")
            prompt, chosen, rejected = _split_implicit(chosen, rejected)
            if not prompt:
                raise DataError(f"{where}: implicit prompt: 'chosen' and 'rejected' share no leading messages, so "
                                "there is no prompt; add a 'prompt' field")
        else:
            prompt = _check_text(rec["prompt"], where, "prompt")
        margin = rec.get("margin")
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
            raise DataError(f"{where}: field 'margin' must be a number, got {type(margin).__name__}")
        if _is_empty(chosen) or _is_empty(rejected):
            counts["skipped_empty_completion"] += 1
            return None
        if chosen == rejected:
            counts["skipped_chosen_equals_rejected"] += 1
            return None
        return PreferencePair(prompt, chosen, rejected, None if margin is None else float(margin), where)
    if "completion" in rec or "label" in rec:
        for key in ("prompt", "completion", "label"):
            if key not in rec or rec[key] is None:
                raise DataError(f"{where}: missing field {key!r} (an unpaired KTO example needs 'prompt', "
                                f"'completion' and 'label'; fields present: {sorted(rec)})")
        if not isinstance(rec["label"], bool):
            raise DataError(f"{where}: field 'label' must be true (desirable) or false (undesirable), "
                            f"got {rec['label']!r}")
        prompt = _check_text(rec["prompt"], where, "prompt")
        completion = _check_text(rec["completion"], where, "completion")
        if _is_empty(completion):
            counts["skipped_empty_completion"] += 1
            return None
        return UnpairedExample(prompt, completion, rec["label"], where)
    raise DataError(f"{where}: missing fields: expected 'prompt'/'chosen'/'rejected' (pairs; 'prompt' may be "
                    f"implicit in conversational pairs) or 'prompt'/'completion'/'label' (KTO); fields present: "
                    f"{sorted(rec)}")


# ------------------------------------------------------------------------------------------------------------
# Tokenizing
# ------------------------------------------------------------------------------------------------------------


def _common_prefix(a: list[int], b: list[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def tokenize_completion(tokenizer: Any, prompt: Text, completion: Text, chat_template: bool = True
                        ) -> tuple[list[int], list[int]]:
    """``(prompt_ids, completion_ids)`` for one prompt and completion (rules in the module docstring)."""
    conversational = isinstance(prompt, list) or isinstance(completion, list)
    use_template = has_chat_template(tokenizer) and (conversational or chat_template)
    if use_template:
        p_msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        c_msgs = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        prompt_ids = _to_id_list(tokenizer.apply_chat_template(p_msgs, add_generation_prompt=True, tokenize=True))
        full = _to_id_list(tokenizer.apply_chat_template(p_msgs + c_msgs, tokenize=True))
    else:
        p_text = render_plain(prompt) if isinstance(prompt, list) else prompt
        c_text = ("\n\n".join(str(m["content"]) for m in completion) if isinstance(completion, list)
                  else completion)
        prompt_ids = _to_id_list(tokenizer(p_text)["input_ids"])
        full = _to_id_list(tokenizer(p_text + c_text)["input_ids"])
        eos = tokenizer.eos_token_id
        if eos is not None and (not full or full[-1] != eos):
            full = full + [eos]
    k = _common_prefix(prompt_ids, full)
    return prompt_ids[:k], full[k:]


def truncate(prompt_ids: list[int], completions: list[list[int]], max_length: int, max_prompt_length: int
             ) -> tuple[list[int], list[list[int]], bool, bool]:
    """Fit ``prompt + completion <= max_length`` for every completion of one pair (the old TRL rule).

    1. Only if ``len(prompt) + max(len(completion)) > max_length``: keep the *last* ``max_prompt_length``
       prompt tokens (the prompt is cut from the left);
    2. then cut each completion from the right to ``max_length - len(prompt)`` tokens (a cut completion
       loses its EOS).

    Returns ``(prompt, completions, prompt_truncated, completion_truncated)``.
    """
    longest = max(len(c) for c in completions)
    cut_prompt = cut_completion = False
    if len(prompt_ids) + longest > max_length:
        if len(prompt_ids) > max_prompt_length:
            prompt_ids, cut_prompt = prompt_ids[len(prompt_ids) - max_prompt_length:], True
        room = max_length - len(prompt_ids)
        if longest > room:
            completions, cut_completion = [c[:room] for c in completions], True
    return prompt_ids, completions, cut_prompt, cut_completion


def tokenize_pair(tokenizer: Any, pair: PreferencePair, max_length: int, max_prompt_length: int,
                  counts: Counter, chat_template: bool = True) -> TokenizedPair | None:
    p_c, chosen = tokenize_completion(tokenizer, pair.prompt, pair.chosen, chat_template)
    p_r, rejected = tokenize_completion(tokenizer, pair.prompt, pair.rejected, chat_template)
    k = _common_prefix(p_c, p_r)
    prompt = p_c[:k]
    chosen, rejected = p_c[k:] + chosen, p_r[k:] + rejected
    prompt, (chosen, rejected), cut_p, cut_c = truncate(prompt, [chosen, rejected], max_length, max_prompt_length)
    counts["truncated_prompt"] += cut_p
    counts["truncated_completion"] += cut_c
    if chosen == rejected:
        counts["skipped_chosen_equals_rejected"] += 1
        return None
    if not chosen or not rejected:
        counts["skipped_empty_completion"] += 1
        return None
    return TokenizedPair(prompt, chosen, rejected, pair.margin or 0.0, pair.where)


def tokenize_unpaired(tokenizer: Any, ex: UnpairedExample, max_length: int, max_prompt_length: int,
                      counts: Counter, chat_template: bool = True) -> TokenizedExample | None:
    prompt, completion = tokenize_completion(tokenizer, ex.prompt, ex.completion, chat_template)
    prompt, (completion,), cut_p, cut_c = truncate(prompt, [completion], max_length, max_prompt_length)
    counts["truncated_prompt"] += cut_p
    counts["truncated_completion"] += cut_c
    if not completion:
        counts["skipped_empty_completion"] += 1
        return None
    return TokenizedExample(prompt, completion, ex.desirable, ex.where)


def as_unpaired(pairs: list[TokenizedPair]) -> list[TokenizedExample]:
    """KTO on paired data: each pair gives a desirable (chosen) and an undesirable (rejected) example."""
    out = []
    for p in pairs:
        out.append(TokenizedExample(p.prompt_ids, p.chosen_ids, True, p.where))
        out.append(TokenizedExample(p.prompt_ids, p.rejected_ids, False, p.where))
    return out


# ------------------------------------------------------------------------------------------------------------
# Whole data sets
# ------------------------------------------------------------------------------------------------------------


def synthetic_pairs(samples: list[Any], system_prompt: str | None = None, prompt_template: str = "{question}"
                    ) -> list[PreferencePair]:
    """Pairs from a prompt source with reference answers: chosen = the sample's answer, rejected = the
    sample's own ``metadata["rejected"]`` string when it has one (the toy tasks' near miss, or a ``rejected``
    field of a JSONL prompt record), else the answer of the next sample (cyclically) whose answer differs.
    For smoke runs and the recipes."""
    out = []
    n = len(samples)
    for i, s in enumerate(samples):
        other = (s.metadata or {}).get("rejected") if hasattr(s, "metadata") else None
        if not isinstance(other, str) or not other or other == s.answer:
            other = next((samples[(i + j) % n].answer for j in range(1, n)
                          if samples[(i + j) % n].answer != s.answer), None)
        if other is None:
            continue
        out.append(PreferencePair(build_messages(s, system_prompt, prompt_template),
                                  [{"role": "assistant", "content": str(s.answer)}],
                                  [{"role": "assistant", "content": str(other)}], None, s.uid))
    if not out:
        raise DataError("synthetic preference pairs need at least two different reference answers in the data")
    return out


def parse_records(records: list[tuple[str, dict]], counts: Counter) -> list[PreferencePair | UnpairedExample]:
    items = [x for where, rec in records if (x := parse_record(rec, where, counts)) is not None]
    kinds = {type(x) for x in items}
    if len(kinds) > 1:
        raise DataError("preference data mixes pairs (chosen/rejected) and unpaired examples (completion/label); "
                        "use one format per file")
    return items


def tokenize_items(tokenizer: Any, items: list, max_length: int, max_prompt_length: int, counts: Counter,
                   chat_template: bool = True) -> list:
    out = []
    for x in items:
        fn = tokenize_pair if isinstance(x, PreferencePair) else tokenize_unpaired
        t = fn(tokenizer, x, max_length, max_prompt_length, counts, chat_template)
        if t is not None:
            out.append(t)
    return out


def load_preference_data(cfg: Any, tokenizer: Any, source: Any = None) -> PreferenceData:
    """Train / held-out sets for ``cfg.preference`` (a :class:`postrl.config.Config`).

    ``preference.path`` None: :func:`synthetic_pairs` from ``source`` (train from its train split, held-out
    from its eval split). Otherwise records from ``path`` (``split``); held out: ``eval_path`` /
    ``eval_split`` when given, else the last ``eval_size`` (at most half) of the records after a seeded
    shuffle. ``train_size`` > 0 caps the training set.
    """
    pf = cfg.preference
    counts: Counter = Counter()
    if pf.path is None:
        if source is None:
            raise DataError("preference.path is not set and no prompt source was given for synthetic pairs")
        train = synthetic_pairs(source.train, cfg.data.system_prompt, cfg.data.prompt_template)
        held = synthetic_pairs(source.eval, cfg.data.system_prompt, cfg.data.prompt_template) if source.eval else []
    else:
        train = parse_records(load_records(pf.path, pf.split), counts)
        random.Random(cfg.resolved_data_seed).shuffle(train)
        if pf.eval_path is not None or pf.eval_split is not None:
            held = parse_records(load_records(pf.eval_path or pf.path, pf.eval_split or pf.split), counts)
            if pf.eval_size:
                held = held[:pf.eval_size]
        else:
            n_eval = min(pf.eval_size, len(train) // 2)
            held, train = train[len(train) - n_eval:], train[:len(train) - n_eval]
    if pf.train_size:
        train = train[:pf.train_size]
    args = (pf.max_length, pf.max_prompt_length, counts, pf.chat_template)
    data = PreferenceData(tokenize_items(tokenizer, train, *args), tokenize_items(tokenizer, held, *args), counts)
    if not data.train:
        raise DataError(f"no usable training examples in {pf.path or 'the synthetic pairs'} "
                        f"(skipped: {dict(counts) or 'none'})")
    if any(counts.values()):
        log.warning("preference data: %s", ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if v))
    return data


def data_fingerprint(items: list) -> str:
    """A short hash of the tokenized items (to check that cached reference log-probs belong to them)."""
    import hashlib

    h = hashlib.sha256()
    for x in items:
        h.update(repr(tuple(getattr(x, f) for f in ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids",
                                                       "desirable") if hasattr(x, f))).encode())
    return h.hexdigest()[:16]


__all__ = [
    "PreferenceData", "PreferencePair", "TokenizedExample", "TokenizedPair", "UnpairedExample", "as_unpaired",
    "data_fingerprint", "load_preference_data", "load_records", "parse_record", "synthetic_pairs",
    "tokenize_completion", "tokenize_pair", "truncate",
]
