"""Prompt samplers: which training prompts come next (``data.sampler: {name: ..., ...}``).

Every sampler has the same interface, used by the RL trainer once per step::

    prompts = sampler.next_batch(k)                      # k samples for this step
    ... generate, score, advantages, update ...
    sampler.update(samples, rewards, advantages)         # one entry per completion (row) of the step
    sampler.metrics()                                    # this step's sampler numbers (then reset)
    sampler.state_dict() / load_state_dict(state)        # everything the next draws depend on

so that a resumed run draws exactly the prompts an uninterrupted run draws (3 + 3 steps == 6 steps). All
randomness comes from ``numpy.random.default_rng([seed, stream, counter])`` with counters kept in the state,
never from a global generator.

| name | paper | what it draws | statistics it keeps |
| --- | --- | --- | --- |
| ``uniform`` | — | a seeded permutation per epoch (single source: exactly ``PromptSampler``); a mixture picks each prompt's task with probability ``weight`` and walks that task's own permutation | walk positions |
| ``difficulty_filter`` | e.g. Polaris / Skywork-OR1 online filtering | the uniform stream, skipping prompts whose running success estimate p̂ is outside ``[lo, hi]`` | p̂ per prompt |
| ``learnability`` | Foster & Foerster 2025 (arXiv 2502.12272) | ``k`` distinct prompts with probability ∝ base · (p̂(1 − p̂) + floor) | p̂ per prompt |
| ``speed`` | SPEED-RL, Zhang et al. 2025 (arXiv 2506.09016) | the uniform stream; the trainer screens each prompt with ``screen`` rollouts and completes only groups whose screen is not uniform | walk positions, counters |
| ``dump`` | DUMP, Wang et al. 2025 (arXiv 2504.09710) | per prompt a task (distribution) with probability softmax(UCB / temperature), UCB_j = mean\\|A\\|_j + c·sqrt(2 ln N / n_j) | windows of \\|A\\| per task, counts |
| ``mopps`` | MoPPS, Qu et al. 2025 (arXiv 2507.04632) | from ``candidates · k`` uniform candidates, the ``k`` whose Thompson sample γ̃ ~ Beta(α, β) is closest to ``target`` | (α, β) per prompt |
| ``rg_curriculum`` | reasoning-gym's curriculum API | each reasoning-gym task at its current difficulty level, the level rising with success (``postrl.data.curriculum``) | levels, success windows |

Running success estimate (``difficulty_filter``, ``learnability``): a prompt's observation in a step is the
share ``s`` of its completions with reward ≥ ``success_threshold``; its estimate is ``p̂ ← s`` the first time
and ``p̂ ← (1 − ema) · p̂ + ema · s`` afterwards. Rows that carry guidance (a hint in the prompt, a teacher
trace: :func:`is_guided`) are left out of every sampler's statistics.
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .base import DataError, check_keyword_args
from .mixture import TASK_KEY, task_name
from .sampler import PromptSampler

SAMPLERS: dict[str, type] = {}


def register_sampler(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in SAMPLERS:
            raise ValueError(f"sampler {name!r} is already registered")
        cls.name = name
        SAMPLERS[name] = cls
        return cls
    return deco


def prompt_key(sample: Any) -> str:
    """The identity of a prompt in sampler statistics: the uid of the original sample (a hinted copy keeps
    its original's uid in ``metadata["orig_uid"]``)."""
    meta = getattr(sample, "metadata", None) or {}
    return str(meta.get("orig_uid") or getattr(sample, "uid", "") or getattr(sample, "question", ""))


def is_guided(sample: Any) -> bool:
    """True for the rows guidance made: a hint in the prompt (``metadata["hint"]``) or a teacher trace
    (``metadata["teacher"]``). Their rewards say how the guided problem went, not the problem itself."""
    meta = getattr(sample, "metadata", None) or {}
    return "hint" in meta or bool(meta.get("teacher"))


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) % 2**32, *[int(s) % 2**32 for s in stream]])


def observations(samples: Sequence[Any], rewards: Sequence[float], threshold: float) -> dict[str, tuple[int, int]]:
    """``{prompt key: (successes, completions)}`` over the unguided rows of a step, in order of first
    appearance; a success is a reward ≥ ``threshold``."""
    out: dict[str, list[int]] = {}
    for s, r in zip(samples, rewards):
        if is_guided(s):
            continue
        o = out.setdefault(prompt_key(s), [0, 0])
        o[0] += int(float(r) >= threshold)
        o[1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def ema_update(p_hat: Optional[float], rate: float, ema: float) -> float:
    """One step of the running success estimate: ``rate`` the first time, else ``(1 - ema) p̂ + ema rate``."""
    return float(rate) if p_hat is None else (1.0 - ema) * p_hat + ema * float(rate)


def _check(ok: bool, key: str, value: Any, requirement: str) -> None:
    if not ok:
        raise DataError(f"data.sampler.kwargs.{key}={value!r}: {requirement}")


# --------------------------------------------------------------------------------------------------------------
# base and uniform
# --------------------------------------------------------------------------------------------------------------


class Sampler:
    """Base class: see the module docstring. ``screen`` > 0 asks the trainer for SPEED's screening rollouts."""

    name = "base"
    screen = 0
    counters: tuple[str, ...] = ()  # per-step counters reported every step (0 when nothing happened)

    def __init__(self, source: Any, seed: int = 0, group_size: int = 1):
        self.samples = list(source.train)
        if not self.samples:
            raise DataError("the prompt sampler needs at least one training sample")
        self.seed = int(seed)
        self.group_size = int(group_size)
        self.weights: Optional[dict[str, float]] = getattr(source, "weights", None)
        self._step: dict[str, float] = {}

    def next_batch(self, k: int) -> list[Any]:
        raise NotImplementedError

    def update(self, samples: Sequence[Any], rewards: Sequence[float], advantages: Sequence[float]) -> None:
        """Feedback after a step: one entry per completion. The uniform sampler ignores it."""

    def metrics(self) -> dict[str, float]:
        """This step's numbers (``sampler/...``), reset after reading."""
        out, self._step = self._step, {}
        for key in self.counters:
            out.setdefault(key, 0.0)
        return out

    def _count(self, key: str, value: float = 1.0) -> None:
        self._step[key] = self._step.get(key, 0.0) + value

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def _check_state(self, state: dict) -> None:
        if state.get("sampler", self.name) != self.name:
            raise ValueError(f"the checkpoint's prompt sampler is {state.get('sampler')!r}, this run's is "
                             f"{self.name!r}; resume with the same data.sampler")


@register_sampler("uniform")
class UniformSampler(Sampler):
    """Today's sampler. One source: exactly :class:`PromptSampler` (a seeded permutation per epoch, the same
    state dict, so checkpoints written before the sampler registry load). A mixture of several tasks:
    prompt ``i`` of batch ``b`` belongs to task ``j`` with probability ``weight_j`` (drawn with
    ``rng(seed, 1, b)``), and each task walks its own seeded permutation (seed ``seed + 7919 (j + 1)``)."""

    def __init__(self, source: Any, seed: int = 0, group_size: int = 1):
        super().__init__(source, seed, group_size)
        names = list(self.weights) if self.weights else []
        self._mixed = len(names) > 1
        if not self._mixed:
            self._walk = PromptSampler(self.samples, seed=self.seed)
            return
        self._names = names
        self._p = np.array([self.weights[n] for n in names], dtype=np.float64)
        self._walks = {}
        for j, name in enumerate(names):
            part = [s for s in self.samples if task_name(s) == name]
            self._walks[name] = PromptSampler(part, seed=self.seed + 7919 * (j + 1))
        self._draws = 0

    def next_batch(self, k: int) -> list[Any]:
        if not isinstance(k, int) or k <= 0:
            raise ValueError(f"batch size must be a positive int, got {k!r}")
        if not self._mixed:
            return self._walk.next_batch(k)
        rng = _rng(self.seed, 1, self._draws)
        self._draws += 1
        tasks = rng.choice(len(self._names), size=k, p=self._p / self._p.sum())
        return [self._walks[self._names[j]].next_batch(1)[0] for j in tasks]

    def state_dict(self) -> dict:
        if not self._mixed:
            return self._walk.state_dict()  # the format of PromptSampler: old checkpoints load
        return {"sampler": self.name, "draws": self._draws,
                "walks": {n: w.state_dict() for n, w in self._walks.items()}}

    def load_state_dict(self, state: dict) -> None:
        if not self._mixed:
            if "sampler" in state:  # a state written by another sampler (or a mixture)
                raise ValueError(f"the checkpoint's prompt sampler state is {state.get('sampler')!r} over "
                                 f"{sorted(state.get('walks', {})) or 'one source'}; this run uses the uniform "
                                 "sampler over one source: resume with the same data section")
            self._walk.load_state_dict(state)
            return
        self._check_state(state)
        if set(state.get("walks", {})) != set(self._walks):
            raise ValueError(f"sampler state is for tasks {sorted(state.get('walks', {}))}, this run has "
                             f"{sorted(self._walks)}")
        self._draws = int(state["draws"])
        for n, w in self._walks.items():
            w.load_state_dict(state["walks"][n])


class _StreamSampler(Sampler):
    """A sampler that reads candidates from the uniform stream (``self.stream``) and keeps its own counters."""

    def __init__(self, source: Any, seed: int = 0, group_size: int = 1):
        super().__init__(source, seed, group_size)
        self.stream = UniformSampler(source, seed, group_size)
        self.batches = 0  # next_batch calls so far: the counter of every per-batch random stream

    def _state(self) -> dict:
        return {"sampler": self.name, "stream": self.stream.state_dict(), "batches": self.batches}

    def _load(self, state: dict) -> None:
        self._check_state(state)
        self.stream.load_state_dict(state["stream"])
        self.batches = int(state["batches"])


# --------------------------------------------------------------------------------------------------------------
# difficulty filter and learnability: a running success estimate per prompt
# --------------------------------------------------------------------------------------------------------------


class _SuccessEstimates(_StreamSampler):
    def __init__(self, source: Any, seed: int, group_size: int, ema: float, success_threshold: float):
        super().__init__(source, seed, group_size)
        _check(0 < ema <= 1, "ema", ema, "must be in (0, 1]")
        _check(math.isfinite(success_threshold), "success_threshold", success_threshold, "must be finite")
        self.ema, self.success_threshold = float(ema), float(success_threshold)
        self.p_hat: dict[str, float] = {}

    def update(self, samples, rewards, advantages) -> None:
        for key, (s, c) in observations(samples, rewards, self.success_threshold).items():
            self.p_hat[key] = ema_update(self.p_hat.get(key), s / c, self.ema)

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        known = [self.p_hat[prompt_key(s)] for s in self.samples if prompt_key(s) in self.p_hat]
        out["sampler/known_frac"] = len(known) / len(self.samples)
        if known:
            out["sampler/p_hat_mean"] = float(np.mean(known))
        return out

    def state_dict(self) -> dict:
        return {**self._state(), "p_hat": dict(self.p_hat)}

    def load_state_dict(self, state: dict) -> None:
        self._load(state)
        self.p_hat = {str(k): float(v) for k, v in state["p_hat"].items()}


@register_sampler("difficulty_filter")
class DifficultyFilterSampler(_SuccessEstimates):
    """Walks the uniform stream and keeps a prompt when it has no estimate yet or ``lo <= p̂ <= hi``; any other
    prompt is skipped (counted in ``sampler/skipped``), except with probability ``explore`` (drawn with
    ``rng(seed, 2, batch)``) so that estimates of skipped prompts can recover. After one pass's worth of
    candidates (``len(train)``) in one batch, the rest of the batch is taken unfiltered
    (``sampler/forced``)."""

    counters = ("sampler/skipped", "sampler/forced")

    def __init__(self, source: Any, seed: int = 0, group_size: int = 1, lo: float = 0.1, hi: float = 0.9,
                 ema: float = 0.5, explore: float = 0.0, success_threshold: float = 1.0):
        super().__init__(source, seed, group_size, ema, success_threshold)
        _check(0 <= lo <= 1, "lo", lo, "must be in [0, 1]")
        _check(lo <= hi <= 1, "hi", hi, f"must be in [lo={lo}, 1]")
        _check(0 <= explore <= 1, "explore", explore, "must be in [0, 1]")
        self.lo, self.hi, self.explore = float(lo), float(hi), float(explore)

    def keep(self, sample: Any) -> bool:
        p = self.p_hat.get(prompt_key(sample))
        return p is None or self.lo <= p <= self.hi

    def next_batch(self, k: int) -> list[Any]:
        rng = _rng(self.seed, 2, self.batches)
        self.batches += 1
        out: list[Any] = []
        scanned = 0
        while len(out) < k:
            s = self.stream.next_batch(1)[0]
            scanned += 1
            if scanned > len(self.samples):
                out.append(s)
                self._count("sampler/forced")
            elif self.keep(s) or (self.explore > 0 and rng.random() < self.explore):
                out.append(s)
            else:
                self._count("sampler/skipped")
        return out


@register_sampler("learnability")
class LearnabilitySampler(_SuccessEstimates):
    """``k`` distinct prompts (with replacement only when ``k`` exceeds the training set) drawn with
    ``rng(seed, 3, batch)`` with probability

        π_i ∝ b_i · (p̂_i (1 − p̂_i) + floor),    p̂_i = prior for a prompt not seen yet,

    where ``b_i`` = 1 / N for one source and ``weight_j / N_j`` for a prompt of mixture task ``j`` (the
    uniform sampler's probability). p̂(1 − p̂) is the variance of a 0/1 reward: the expected squared advantage
    of a group, zero for prompts that are always or never solved (Foster & Foerster 2025, "Learning to
    reason at the frontier of learnability"). ``floor`` > 0 keeps every prompt reachable."""

    def __init__(self, source: Any, seed: int = 0, group_size: int = 1, ema: float = 0.5, prior: float = 0.5,
                 floor: float = 0.01, success_threshold: float = 1.0):
        super().__init__(source, seed, group_size, ema, success_threshold)
        _check(0 <= prior <= 1, "prior", prior, "must be in [0, 1]")
        _check(floor >= 0, "floor", floor, "must be >= 0")
        self.prior, self.floor = float(prior), float(floor)
        if self.weights and len(self.weights) > 1:
            sizes: dict[str, int] = {}
            for s in self.samples:
                sizes[task_name(s)] = sizes.get(task_name(s), 0) + 1
            self.base = np.array([self.weights[task_name(s)] / sizes[task_name(s)] for s in self.samples])
        else:
            self.base = np.full(len(self.samples), 1.0 / len(self.samples))
        self.keys = [prompt_key(s) for s in self.samples]

    def probabilities(self) -> np.ndarray:
        p = np.array([self.p_hat.get(k, self.prior) for k in self.keys], dtype=np.float64)
        w = self.base * (p * (1.0 - p) + self.floor)
        if w.sum() <= 0:  # floor 0 and every prompt solved always or never: fall back to the base
            w = self.base.copy()
        return w / w.sum()

    def next_batch(self, k: int) -> list[Any]:
        rng = _rng(self.seed, 3, self.batches)
        self.batches += 1
        probs = self.probabilities()
        replace = k > int((probs > 0).sum())
        idx = rng.choice(len(self.samples), size=k, replace=replace, p=probs)
        return [self.samples[i] for i in idx]


# --------------------------------------------------------------------------------------------------------------
# SPEED: screening rollouts (the trainer runs them, see postrl.rollout.selection.speed_rollout)
# --------------------------------------------------------------------------------------------------------------


@register_sampler("speed")
class SpeedSampler(_StreamSampler):
    """SPEED-RL (Zhang et al. 2025, arXiv 2506.09016, Alg. 1): each candidate prompt first gets ``screen``
    rollouts; only prompts whose screen is neither all right nor all wrong (for any reward: not all equal)
    get the remaining ``rollout.n - screen`` rollouts and enter the batch. Candidates come from the uniform
    stream, ``ceil(oversample · missing)`` at a time, for at most ``max_tries`` screening rounds per step.
    The pass-rate estimate is the screen itself; there is no statistic across steps besides the stream."""

    counters = ("sampler/screened", "sampler/skipped", "sampler/screen_rollouts", "sampler/tries")

    def __init__(self, source: Any, seed: int = 0, group_size: int = 8, screen: int = 4, max_tries: int = 8,
                 oversample: float = 1.0):
        super().__init__(source, seed, group_size)
        _check(isinstance(screen, int) and 1 <= screen < group_size, "screen", screen,
               f"must be an int in [1, rollout.n - 1 = {group_size - 1}] (the screen is part of the group)")
        _check(isinstance(max_tries, int) and max_tries >= 1, "max_tries", max_tries, "must be an int >= 1")
        _check(oversample >= 1, "oversample", oversample, "must be >= 1")
        self.screen, self.max_tries, self.oversample = int(screen), int(max_tries), float(oversample)

    def next_batch(self, k: int) -> list[Any]:
        self.batches += 1
        return self.stream.next_batch(k)

    def record_screen(self, candidates: int, kept: int, rollouts: int) -> None:
        """One screening round: ``candidates`` screened with ``rollouts`` completions, ``kept`` passed."""
        self._count("sampler/screened", candidates)
        self._count("sampler/skipped", candidates - kept)
        self._count("sampler/screen_rollouts", rollouts)
        self._count("sampler/tries")

    def state_dict(self) -> dict:
        return self._state()

    def load_state_dict(self, state: dict) -> None:
        self._load(state)


# --------------------------------------------------------------------------------------------------------------
# DUMP: UCB over task distributions
# --------------------------------------------------------------------------------------------------------------


def ucb_scores(mean_abs_adv: Sequence[float], counts: Sequence[int], c: float) -> np.ndarray:
    """DUMP's score per distribution j: ``mean|A|_j + c · sqrt(2 ln(Σ n) / n_j)``, +inf where ``n_j = 0``."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    out = np.full(len(counts), np.inf)
    seen = counts > 0
    if seen.any():
        bonus = np.sqrt(2.0 * math.log(total) / counts[seen])
        out[seen] = np.asarray(mean_abs_adv, dtype=np.float64)[seen] + c * bonus
    return out


def ucb_probabilities(scores: Sequence[float], temperature: float) -> np.ndarray:
    """softmax(score / temperature); when some scores are +inf (unvisited), uniform over those."""
    scores = np.asarray(scores, dtype=np.float64)
    inf = np.isinf(scores)
    if inf.any():
        return inf / inf.sum()
    z = scores / temperature
    z = np.exp(z - z.max())
    return z / z.sum()


@register_sampler("dump")
class DumpSampler(Sampler):
    """DUMP (Wang et al. 2025, arXiv 2504.09710, Alg. 1): the tasks of a mixture (or the values of
    ``metadata[key]`` of a single source) are the arms of a bandit. For task j, ``mean|A|_j`` is the mean
    absolute advantage over its last ``window`` completions and ``n_j`` the number of its prompts trained on
    so far; each prompt of a batch picks task j with probability softmax(UCB / temperature) (see
    :func:`ucb_scores`; unvisited tasks first), drawn with ``rng(seed, 4, batch)``, and then the next prompt
    of that task's own seeded permutation. The mixture weights are not used."""

    def __init__(self, source: Any, seed: int = 0, group_size: int = 1, window: int = 300, c: float = 1.0,
                 temperature: float = 0.1, key: str = TASK_KEY):
        super().__init__(source, seed, group_size)
        _check(isinstance(window, int) and window >= 1, "window", window, "must be an int >= 1")
        _check(c >= 0, "c", c, "must be >= 0")
        _check(temperature > 0, "temperature", temperature, "must be > 0")
        self.window, self.c, self.temperature, self.key = int(window), float(c), float(temperature), str(key)
        groups: dict[str, list[Any]] = {}
        for s in self.samples:
            groups.setdefault(self.arm(s), []).append(s)
        self.arms = sorted(groups)
        self.walks = {a: PromptSampler(groups[a], seed=self.seed + 7919 * (j + 1)) for j, a in enumerate(self.arms)}
        self.adv: dict[str, deque] = {a: deque(maxlen=self.window) for a in self.arms}
        self.counts = {a: 0 for a in self.arms}
        self.batches = 0

    def arm(self, sample: Any) -> str:
        meta = getattr(sample, "metadata", None) or {}
        return str(meta.get(self.key, "default"))

    def scores(self) -> np.ndarray:
        means = [float(np.mean(self.adv[a])) if self.adv[a] else 0.0 for a in self.arms]
        return ucb_scores(means, [self.counts[a] for a in self.arms], self.c)

    def probabilities(self) -> np.ndarray:
        return ucb_probabilities(self.scores(), self.temperature)

    def next_batch(self, k: int) -> list[Any]:
        rng = _rng(self.seed, 4, self.batches)
        self.batches += 1
        probs = self.probabilities()
        arms = rng.choice(len(self.arms), size=k, p=probs)
        for a, p in zip(self.arms, probs):
            self._step[f"sampler/prob/{a}"] = float(p)
        return [self.walks[self.arms[j]].next_batch(1)[0] for j in arms]

    def update(self, samples, rewards, advantages) -> None:
        seen: set[str] = set()
        for s, a in zip(samples, advantages):
            if is_guided(s):
                continue
            arm = self.arm(s)
            if arm not in self.adv:
                continue
            self.adv[arm].append(abs(float(a)))
            key = prompt_key(s)
            if key not in seen:  # n_j counts prompts (groups), not completions
                seen.add(key)
                self.counts[arm] += 1

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        for a, u in zip(self.arms, self.scores()):
            if self.adv[a]:
                out[f"sampler/mean_abs_adv/{a}"] = float(np.mean(self.adv[a]))
            if math.isfinite(u):
                out[f"sampler/ucb/{a}"] = float(u)
        return out

    def state_dict(self) -> dict:
        return {"sampler": self.name, "batches": self.batches, "counts": dict(self.counts),
                "adv": {a: list(d) for a, d in self.adv.items()}, "walks": {a: w.state_dict() for a, w in self.walks.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state)
        if set(state["walks"]) != set(self.walks):
            raise ValueError(f"DUMP state is for tasks {sorted(state['walks'])}, this run has {self.arms}")
        self.batches = int(state["batches"])
        self.counts = {a: int(state["counts"][a]) for a in self.arms}
        self.adv = {a: deque((float(x) for x in state["adv"][a]), maxlen=self.window) for a in self.arms}
        for a, w in self.walks.items():
            w.load_state_dict(state["walks"][a])


# --------------------------------------------------------------------------------------------------------------
# MoPPS: Beta posterior per prompt, Thompson sampling towards a target success rate
# --------------------------------------------------------------------------------------------------------------


@register_sampler("mopps")
class MoppsSampler(_StreamSampler):
    """MoPPS (Qu et al. 2025, arXiv 2507.04632): prompt i's success rate has the posterior Beta(α_i, β_i),
    starting at Beta(alpha0, beta0). A step with ``s`` successes out of ``c`` completions updates it with
    the forgetting factor λ = ``decay``:

        α_i ← λ α_i + (1 − λ) alpha0 + s,      β_i ← λ β_i + (1 − λ) beta0 + (c − s)

    (λ = 1: the plain conjugate update). To draw ``k`` prompts, ``candidates · k`` candidates are read from
    the uniform stream, each gets a Thompson sample γ̃_i ~ Beta(α_i, β_i) (``rng(seed, 5, batch)``, in
    candidate order), and the ``k`` with the smallest |γ̃_i − target| are taken (ties: earlier candidate),
    in candidate order. No rollout is spent on the candidates left out."""

    counters = ("sampler/skipped",)

    def __init__(self, source: Any, seed: int = 0, group_size: int = 1, target: float = 0.5, candidates: int = 4,
                 decay: float = 1.0, alpha0: float = 1.0, beta0: float = 1.0, success_threshold: float = 1.0):
        super().__init__(source, seed, group_size)
        _check(0 <= target <= 1, "target", target, "must be in [0, 1]")
        _check(isinstance(candidates, int) and candidates >= 1, "candidates", candidates, "must be an int >= 1")
        _check(0 < decay <= 1, "decay", decay, "must be in (0, 1]")
        _check(alpha0 > 0, "alpha0", alpha0, "must be > 0")
        _check(beta0 > 0, "beta0", beta0, "must be > 0")
        self.target, self.candidates, self.decay = float(target), int(candidates), float(decay)
        self.alpha0, self.beta0, self.success_threshold = float(alpha0), float(beta0), float(success_threshold)
        self.posterior: dict[str, list[float]] = {}

    def params(self, sample: Any) -> tuple[float, float]:
        a, b = self.posterior.get(prompt_key(sample), (self.alpha0, self.beta0))
        return float(a), float(b)

    def select(self, candidates: list[Any], draws: np.ndarray, k: int) -> list[int]:
        """Indices of the ``k`` candidates whose draws are closest to the target, ascending."""
        order = np.argsort(np.abs(draws - self.target), kind="stable")[:k]
        return sorted(int(i) for i in order)

    def next_batch(self, k: int) -> list[Any]:
        rng = _rng(self.seed, 5, self.batches)
        self.batches += 1
        cands = self.stream.next_batch(self.candidates * k)
        draws = np.array([rng.beta(*self.params(s)) for s in cands])
        chosen = self.select(cands, draws, k)
        self._count("sampler/skipped", len(cands) - len(chosen))
        self._step["sampler/predicted_mean"] = float(np.mean(
            [a / (a + b) for a, b in (self.params(cands[i]) for i in chosen)]))
        return [cands[i] for i in chosen]

    def update(self, samples, rewards, advantages) -> None:
        lam = self.decay
        for key, (s, c) in observations(samples, rewards, self.success_threshold).items():
            a, b = self.posterior.get(key, (self.alpha0, self.beta0))
            self.posterior[key] = [lam * a + (1 - lam) * self.alpha0 + s, lam * b + (1 - lam) * self.beta0 + (c - s)]

    def state_dict(self) -> dict:
        return {**self._state(), "posterior": {k: list(v) for k, v in self.posterior.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._load(state)
        self.posterior = {str(k): [float(v[0]), float(v[1])] for k, v in state["posterior"].items()}


# --------------------------------------------------------------------------------------------------------------
# building a sampler from the config; zero-variance accounting
# --------------------------------------------------------------------------------------------------------------


def sampler_parameters(cls: type) -> dict[str, Any]:
    """The keyword arguments a sampler takes in ``data.sampler`` with their defaults."""
    skip = ("self", "source", "seed", "group_size")
    return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items() if n not in skip}


def build_sampler(name: str, kwargs: dict[str, Any], source: Any, seed: int, group_size: int) -> Sampler:
    """The sampler ``name`` over ``source.train`` with ``kwargs``; an unknown name or keyword raises
    :class:`DataError` naming the valid ones (with their defaults)."""
    if name not in SAMPLERS:
        raise DataError(f"unknown prompt sampler {name!r}; valid samplers: {', '.join(sorted(SAMPLERS))}")
    cls = SAMPLERS[name]
    check_keyword_args("data.sampler", name, kwargs, sampler_parameters(cls))
    return cls(source, seed=seed, group_size=group_size, **kwargs)


def zero_variance(rewards: Sequence[float], group_ids: Sequence[int], eps: float = 1e-12) -> tuple[int, int, int]:
    """``(groups, zero-variance groups, rows in zero-variance groups)`` of a batch: a group has zero reward
    variance when max − min of its rewards is at most ``eps``."""
    groups: dict[int, list[float]] = {}
    for r, g in zip(rewards, group_ids):
        groups.setdefault(int(g), []).append(float(r))
    zero = [g for g in groups.values() if max(g) - min(g) <= eps]
    return len(groups), len(zero), sum(len(g) for g in zero)


class RolloutLedger:
    """What one step spent on rollouts: completions and tokens generated (screening, dropped and regenerated
    groups included), and the completions of zero-variance groups that never reached the update (dropped by
    dynamic sampling, screened out by SPEED, replaced by Guide). Reset at the start of every step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.rows = 0
        self.tokens = 0
        self.zero_var_rows_discarded = 0
        self.zero_var_groups_discarded = 0

    def generated(self, rows: int, tokens: int) -> None:
        self.rows += int(rows)
        self.tokens += int(tokens)

    def discarded(self, rows: int, groups: int) -> None:
        """``rows`` completions of ``groups`` zero-variance groups were generated and then not trained on."""
        self.zero_var_rows_discarded += int(rows)
        self.zero_var_groups_discarded += int(groups)

    def metrics(self, rewards: Sequence[float], group_ids: Sequence[int], generated: Sequence[bool]) -> dict[str, float]:
        """The step's accounting given the trained batch (``generated[i]`` False for rows the policy did not
        sample, e.g. teacher traces):

        - ``zero_var/group_frac``: share of the trained groups whose rewards are all equal;
        - ``zero_var/sampled_group_frac``: the same over every group sampled this step (dropped ones too);
        - ``zero_var/rollouts``: completions spent on zero-variance groups (trained or dropped);
        - ``zero_var/rollouts_frac``: that over ``rollouts_generated``;
        - ``rollouts_generated``, ``gen_tokens_total``: everything generated this step."""
        by_group: dict[int, list[float]] = {}
        for r, g in zip(rewards, group_ids):
            by_group.setdefault(int(g), []).append(float(r))
        zero_ids = {g for g, v in by_group.items() if max(v) - min(v) <= 1e-12}
        groups, zero = len(by_group), len(zero_ids)
        gen_zero_rows = sum(1 for g, ok in zip(group_ids, generated) if ok and int(g) in zero_ids)
        rows = max(self.rows, 1)
        all_groups = groups + self.zero_var_groups_discarded
        zero_all = zero + self.zero_var_groups_discarded
        spent = gen_zero_rows + self.zero_var_rows_discarded
        return {"zero_var/group_frac": zero / max(groups, 1),
                "zero_var/sampled_group_frac": zero_all / max(all_groups, 1),
                "zero_var/rollouts": float(spent), "zero_var/rollouts_frac": spent / rows,
                "rollouts_generated": float(self.rows), "gen_tokens_total": float(self.tokens)}
