"""Built-in procedural toy tasks on short symbol strings (``data.source: toy``).

A tiny randomly initialised model learns these from a few hundred examples in seconds on a CPU and
generalizes to strings it has never seen, so the effect of each post-training stage can be measured on
held-out prompts (``recipes/pipeline_tiny.yaml``). Tasks (``data.task``):

    copy     "copy 4821"    -> "4821"
    reverse  "reverse 4821" -> "1284"
    sort     "sort 4821"    -> "1248"

``data.task_kwargs``: ``length`` (symbols per string, default 4), ``alphabet`` (default ``0123456789``),
``partial_credit`` (default true).

Split: held-out strings are drawn first, then training strings, without replacement from the
``len(alphabet) ** length`` possible strings in an order given by the data seed; a string whose answer is a
held-out answer is not used for training. So no held-out prompt is a training prompt and no held-out answer
is a training answer (for ``sort``: no held-out string is a permutation of a training string).

Score: the extracted answer is compared with the reference position by position; the reward is the share
of equal positions over the longer of the two strings (1 only for an exact match; with
``partial_credit: false`` exactly 0 or 1). Accuracy counts exact matches only.

Near misses: every sample carries in ``metadata["rejected"]`` the right answer to the prompt with one symbol
of its string changed (for ``sort``: a sorted string with one symbol off), the kind of mistake a partly
trained model makes. Synthetic preference pairs (:func:`postrl.data.pairs.synthetic_pairs`) use it as the
rejected completion.
"""

from __future__ import annotations

import difflib
import random
from typing import Any, Callable, Optional

from .base import DataError, PromptSource, Sample

TOY_TASKS: dict[str, Callable[[str], str]] = {
    "copy": lambda s: s,
    "reverse": lambda s: s[::-1],
    "sort": lambda s: "".join(sorted(s)),
}
TOY_KWARGS = ("length", "alphabet", "partial_credit")


def positional_match(predicted: str, gold: str) -> float:
    """Share of positions where ``predicted`` and ``gold`` agree, over the longer length (1 iff equal)."""
    n = max(len(predicted), len(gold))
    if n == 0:
        return 1.0
    return sum(a == b for a, b in zip(predicted, gold)) / n


def near_miss(s: str, alphabet: str, rng: random.Random) -> str:
    """``s`` with one position (chosen by ``rng``) replaced by a different symbol of ``alphabet``."""
    i = rng.randrange(len(s))
    other = rng.choice([c for c in alphabet if c != s[i]])
    return s[:i] + other + s[i + 1:]


class ToySource(PromptSource):
    """Prompts of a procedural toy task (see the module docstring); ``train`` and ``eval`` never share a
    string. Raises :class:`DataError` for an unknown task or option, or when the task has fewer distinct
    strings than ``train_size + eval_size``."""

    def __init__(self, task: str = "reverse", task_kwargs: Optional[dict[str, Any]] = None, train_size: int = 200,
                 eval_size: int = 100, seed: int = 0, answer_extraction: str = "raw"):
        super().__init__(answer_extraction)
        if task not in TOY_TASKS:
            close = difflib.get_close_matches(str(task), list(TOY_TASKS), n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise DataError(f"unknown toy task {task!r}.{hint} Valid toy tasks: {', '.join(TOY_TASKS)}")
        kw = dict(task_kwargs or {})
        bad = [k for k in kw if k not in TOY_KWARGS]
        if bad:
            raise DataError(f"toy task {task!r}: unknown task_kwargs {', '.join(map(repr, bad))}; "
                            f"valid: {', '.join(TOY_KWARGS)}")
        length, alphabet = kw.get("length", 4), kw.get("alphabet", "0123456789")
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise DataError(f"toy task {task!r}: task_kwargs.length must be an int >= 1, got {length!r}")
        if not isinstance(alphabet, str) or len(set(alphabet)) != len(alphabet) or len(alphabet) < 2 \
                or any(c.isspace() for c in alphabet):
            raise DataError(f"toy task {task!r}: task_kwargs.alphabet must be a string of at least 2 distinct "
                            f"non-space symbols, got {alphabet!r}")
        for name, size in (("train_size", train_size), ("eval_size", eval_size)):
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise DataError(f"{name} must be a non-negative int, got {size!r}")
        space = len(alphabet) ** length
        if train_size + eval_size > space:
            raise DataError(f"toy task {task!r} has only {space} distinct strings of length {length} over "
                            f"{alphabet!r}; train_size + eval_size = {train_size + eval_size} is more. Use a "
                            "longer task_kwargs.length or fewer examples.")
        self.task, self.name, self.seed = task, f"toy-{task}", int(seed)
        self.length, self.alphabet = length, alphabet
        self.partial_credit = bool(kw.get("partial_credit", True))
        fn = TOY_TASKS[task]
        rng = random.Random(self.seed)

        def indices():  # a seeded random order of the strings (repeats filtered below for huge spaces)
            if space <= 100_000:
                yield from rng.sample(range(space), space)
            else:
                while True:
                    yield rng.randrange(space)

        order = indices()
        seen: set[str] = set()
        eval_answers: set[str] = set()

        def draw(n: int, split: str) -> list[Sample]:
            """``n`` new strings; training strings never share an answer with a held-out one (for ``sort``,
            no held-out string is a permutation of a training string)."""
            out: list[Sample] = []
            for _ in range(50 * n + 1000):
                if len(out) == n:
                    break
                index = next(order, None)
                if index is None:
                    break
                s = "".join(alphabet[(index // len(alphabet) ** p) % len(alphabet)] for p in range(length))
                answer = fn(s)
                if s in seen or (split == "train" and answer in eval_answers):
                    continue
                seen.add(s)
                meta = {"task": self.name, "split": split, "index": len(out),
                        "rejected": fn(near_miss(s, alphabet, rng))}
                out.append(Sample(question=f"{task} {s}", answer=answer, metadata=meta,
                                  uid=f"{self.name}/{split}/{len(out)}"))
            if len(out) < n:
                raise DataError(f"toy task {task!r}: only {len(out)} {split} strings of length {length} over "
                                f"{alphabet!r} found whose answers differ from the held-out answers (wanted {n}); "
                                "use a longer task_kwargs.length or fewer examples.")
            return out

        self.eval = draw(eval_size, "eval")
        eval_answers.update(s.answer for s in self.eval)
        self.train = draw(train_size, "train")

    def _score_extracted(self, extracted: str, sample: Sample) -> float:
        score = positional_match(extracted.strip(), sample.answer)
        return score if self.partial_credit else float(score == 1.0)
