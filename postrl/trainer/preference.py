"""Preference optimization (``postrl dpo``): the DPO family, offline and online / iterative.

Offline, top to bottom::

    pairs  = load_preference_data(cfg)                 # tokenized, truncated, bad input counted
    ref    = reference log-probs of every train and held-out pair, computed ONCE with the initial
             policy before any update (RUN_DIR/ref_logps.pt; skipped for reference-free losses)
    eval before: held-out implicit-reward accuracy and margin
    for epoch, batch of preference.batch_size pairs (order: a permutation seeded by (seed, epoch)):
        for micro batch: logps of chosen and rejected in one forward (2B rows)
                         loss = mean_B preference_loss(PairLogps(logps, ref), cfg.preference); backward
        clip grads; optimizer step; log; checkpoint every train.save_every updates
    eval after; RUN_DIR/final = the trained model (save_pretrained)

Online / iterative (``preference.online``), per round::

    prompts    = preference.prompts_per_round prompts of ``data`` (seeded by (seed, round))
    samples    = rollout.n completions each from the current policy (Generator)
    rewards    = RewardPipeline(cfg.rewards)(texts, samples).total
    pairs      = best vs worst per prompt (ties skipped) or RSO (statistical rejection sampling)
    reference  = the policy at the start of the round (online_reference: round, iterative DPO as in
                 Xiong et al. 2024 / Dong et al. 2024) or the initial model (online_reference: initial);
                 its log-probs of the round's pairs are computed once, before the round's updates
    train preference.epochs over the round's pairs as above

The trained token ids of online pairs are exactly the sampled ones (no re-tokenization).

Entry point for other code (the pipeline): :func:`train_dpo`.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from postrl.algorithms.preference import (
    PREFERENCE_LOSSES,
    PairLogps,
    UnpairedLogps,
    best_worst_pair,
    implicit_reward_margins,
    rso_pair,
)
from postrl.config import Config, ConfigError, check_command
from postrl.data import build_data_source
from postrl.data.pairs import (
    PreferenceData,
    TokenizedExample,
    TokenizedPair,
    as_unpaired,
    data_fingerprint,
    load_preference_data,
    truncate,
)
from postrl.models.loading import load_from_config, load_policy
from postrl.models.lora import lora_enabled, reference_view
from postrl.models.logprobs import completion_logprobs
from postrl.run import Job, StepOutput, TrainingError, distributed, run_job
from postrl.run.batching import epoch_batches, right_pad
from postrl.run.optim import accumulated_update, build_optimizer
from postrl.run.progress import PAIR_FIELDS
from postrl.run.rng import step_seed

log = logging.getLogger(__name__)

REF_FILE = "ref_logps.pt"


# ------------------------------------------------------------------------------------------------------------
# Log-probs
# ------------------------------------------------------------------------------------------------------------


def sequence_logps(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each completion given its prompt, and the completion lengths; both ``[B]``."""
    device = next(model.parameters()).device
    ids, mask = right_pad(completions, pad_id, device)
    # the plain forward (no shared prompt pass): the policy's and the cached reference's log-probs then come from
    # the same computation, so the margin before training is exactly 0
    lp, _ = completion_logprobs(model, prompts, ids, mask, pad_id, share_prefix=False)
    return lp.sum(-1), mask.sum(-1).to(lp.dtype)


class PreferenceTrainer(Job):
    """The ``postrl dpo`` step (offline, or online rounds) as a :class:`postrl.run.Job`."""

    command = "dpo"
    progress_fields = PAIR_FIELDS

    def __init__(self, cfg: Config, checkpoint: Path | None = None):
        self.cfg = cfg
        pf = cfg.preference
        check_command(cfg, "dpo")
        self.loss_fn = PREFERENCE_LOSSES.get_fn(pf.loss)  # the name was checked by the config's validation
        self.unpaired = bool(getattr(self.loss_fn, "unpaired", False))
        self.needs_ref = bool(getattr(self.loss_fn, "needs_reference", True))
        if pf.online:
            from postrl.rewards import resolve_reward

            for spec in cfg.rewards:
                resolve_reward(spec.name)
        self.resumed = checkpoint is not None
        self.model, self.tokenizer, self.model_source = load_policy(cfg.model, checkpoint)  # + LoRA adapters
        self.pad = self.tokenizer.pad_token_id
        self.device = next(self.model.parameters()).device

        self.source = build_data_source(cfg) if pf.online or pf.path is None else None
        self.data: PreferenceData | None = None
        if not pf.online:
            self.data = load_preference_data(cfg, self.tokenizer, self.source)
            if self.unpaired and isinstance(self.data.train[0], TokenizedPair):
                # KTO on pairs: chosen -> desirable, rejected -> undesirable; held-out pairs stay pairs and are
                # evaluated with the implicit reward beta * h
                self.data.train = as_unpaired(self.data.train)
            elif not self.unpaired and not isinstance(self.data.train[0], TokenizedPair):
                raise ConfigError(f"preference.loss={pf.loss} needs chosen/rejected pairs, but the "
                                  "data is unpaired (prompt/completion/label); use preference.loss=kto.")
            self.kl_completions = self._mismatched(self.data.train) if self.unpaired else None
            self.eval_kl_completions = (self._mismatched(self.data.eval) if self.unpaired and self.data.eval
                                        and isinstance(self.data.eval[0], TokenizedExample) else None)

        self.dist = distributed.current()  # None: one process; else each rank trains on its share of a batch
        if self.dist is not None and pf.online and self.needs_ref and pf.online_reference == "initial":
            checkpoint_ref = True  # the initial reference is loaded (a sharded model is not deep-copied)
        else:
            checkpoint_ref = checkpoint is not None
        self.train_model = self.model if self.dist is None else self.dist.prepare(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.total_steps = self._planned_steps()
        self.optimizer, self.scheduler = build_optimizer(self.params, cfg.train, self.total_steps)
        self.ref_model, self.rewards = None, None
        if pf.online:
            from postrl.rewards import RewardContext, RewardPipeline
            from postrl.rollout.backend import build_backend

            self.rewards = RewardPipeline(cfg.rewards, self.source, cfg.scoring, RewardContext(
                source=self.source, tokenizer=self.tokenizer, device=self.device))
            if cfg.rollout.backend != "torch":  # no weight sync here yet: a server would sample the initial model
                raise ConfigError(f"rollout.backend={cfg.rollout.backend!r}: online preference training samples with "
                                  "the torch backend only for now (served generation is wired into postrl train)")
            self.backend = build_backend(cfg.rollout.backend, self.model, self.tokenizer)
            if self.dist is not None and self.dist.strategy == "fsdp":  # generation on the gathered weights
                self.backend = distributed.UnshardedBackend(self.backend, self.model, self.dist)
            if self.needs_ref and pf.online_reference == "initial" and lora_enabled(cfg.model):
                self.ref_model = reference_view(self.model)  # the base model: the policy with its adapter disabled
            elif self.needs_ref and pf.online_reference == "initial":
                self.ref_model = copy.deepcopy(self.model) if not checkpoint_ref else load_from_config(cfg.model)[0]
                self.ref_model.eval().requires_grad_(False)
                if self.dist is not None:
                    self.dist.prepare(self.ref_model, trainable=False)
        # online rounds: the round being trained, the step it started at, its pairs and reference log-probs
        self.round, self.round_start_step, self.round_data = 0, 0, None
        self.ref: dict[str, dict[str, torch.Tensor]] | None = None
        self.run = None

    # ----- setup helpers -------------------------------------------------------------------------------------
    def _planned_round_updates(self) -> int:
        """Updates an online round is planned to have: preference.epochs passes over prompts_per_round pairs."""
        pf = self.cfg.preference
        return pf.epochs * math.ceil(pf.prompts_per_round / pf.batch_size)

    def _planned_steps(self) -> int:
        pf = self.cfg.preference
        if pf.online:
            return pf.rounds * self._planned_round_updates()
        return pf.epochs * math.ceil(len(self.data.train) / pf.batch_size)

    def _mismatched(self, items: list[TokenizedExample]) -> list[list[int]]:
        """KTO's mismatched completion for each example: the completion of the next example (cyclically) in the
        fixed data order, truncated with the example's prompt to max_length."""
        pf = self.cfg.preference
        out = []
        for i, x in enumerate(items):
            other = items[(i + 1) % len(items)].completion_ids
            out.append(other[: max(1, pf.max_length - len(x.prompt_ids))])
        return out

    @torch.no_grad()
    def _logps_of(self, model, items: list, completions: list[list[int]] | None = None,
                  which: str = "chosen") -> torch.Tensor:
        """Summed log-probs ``[N]`` of every item's completion (``which``: chosen | rejected | completion), or of
        the given ``completions`` under each item's prompt; batched by preference.eval_batch_size."""
        was_training = model.training
        model.eval()
        bs = self.cfg.preference.eval_batch_size
        out = []
        for s in range(0, len(items), bs):
            chunk = items[s:s + bs]
            comps = (completions[s:s + bs] if completions is not None
                     else [getattr(x, f"{which}_ids") for x in chunk])
            out.append(sequence_logps(model, [x.prompt_ids for x in chunk], comps, self.pad)[0].float().cpu())
        model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def _ref_for(self, model, items: list, kl_completions: list[list[int]] | None) -> dict[str, torch.Tensor]:
        if items and isinstance(items[0], TokenizedExample):
            out = {"logps": self._logps_of(model, items, which="completion")}
            if kl_completions is not None:
                out["kl"] = self._logps_of(model, items, kl_completions)
            return out
        return {"chosen": self._logps_of(model, items, which="chosen"),
                "rejected": self._logps_of(model, items, which="rejected")}

    def _reference_cache(self, run_dir: Path, fresh: bool) -> dict[str, dict[str, torch.Tensor]]:
        """Reference log-probs of the train and held-out sets, computed once with the initial policy (before any
        update) and kept in RUN_DIR/ref_logps.pt, so a resumed run neither recomputes them nor needs the initial
        model."""
        path = run_dir / REF_FILE
        fp = data_fingerprint(self.data.train) + data_fingerprint(self.data.eval)
        if not fresh:
            if not path.is_file():
                raise TrainingError(f"cannot resume: {path} (the cached reference log-probs) is missing")
            cache = torch.load(path, map_location="cpu", weights_only=False)
            if cache.get("fingerprint") != fp:
                raise TrainingError(f"cannot resume: the preference data differs from the data of {path} "
                                    "(its reference log-probs belong to other pairs)")
            return cache
        t0 = time.time()
        initial = reference_view(self.model) if lora_enabled(self.cfg.model) else self.model  # LoRA: the base model
        cache = {"fingerprint": fp, "train": self._ref_for(initial, self.data.train, self.kl_completions),
                 "eval": self._ref_for(initial, self.data.eval, self.eval_kl_completions)}
        if self.dist is None or self.dist.is_main:  # every rank computed the same numbers; rank 0 writes them
            tmp = path.with_name(f".{path.name}.tmp")
            torch.save(cache, tmp)
            os.replace(tmp, path)
        log.info("reference log-probs of %d + %d items in %.1fs", len(self.data.train), len(self.data.eval),
                 time.time() - t0)
        self.run.results["ref_logps_time_s"] = time.time() - t0
        return cache

    # ----- one batch -----------------------------------------------------------------------------------------
    def batch_loss(self, items: list, ref: dict[str, torch.Tensor] | None, idx: list[int],
                   kl_completions: list[list[int]] | None = None, model: Any = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-item losses ``[b]`` and stats of the items ``idx`` under the current policy (differentiable;
        ``model``: the module the forward goes through, default the policy)."""
        a = self.cfg.preference
        if not self.unpaired:
            return self.loss_fn(self.pair_logps(items, ref, idx, model), a)
        chunk = [items[i] for i in idx]
        prompts = [x.prompt_ids for x in chunk]
        sel = torch.as_tensor(idx, dtype=torch.long)
        lp, _ = sequence_logps(model or self.model, prompts, [x.completion_ids for x in chunk], self.pad)
        with torch.no_grad():
            kl_lp, _ = sequence_logps(self.model, prompts, [kl_completions[i] for i in idx], self.pad)
        desirable = torch.tensor([x.desirable for x in chunk], device=lp.device)
        inp = UnpairedLogps(lp, ref["logps"][sel].to(lp), desirable, kl_lp, ref["kl"][sel].to(lp))
        return self.loss_fn(inp, a)

    def pair_logps(self, items: list, ref: dict[str, torch.Tensor] | None, idx: list[int],
                   model: Any = None) -> PairLogps:
        """Summed log-probs of the chosen and rejected completions of pairs ``idx`` under the current policy
        (one forward over both), with their cached reference log-probs when there is a reference."""
        chunk = [items[i] for i in idx]
        prompts = [x.prompt_ids for x in chunk]
        lp, lens = sequence_logps(model or self.model, prompts + prompts,
                                  [x.chosen_ids for x in chunk] + [x.rejected_ids for x in chunk], self.pad)
        b = len(chunk)
        inp = PairLogps(lp[:b], lp[b:], lens[:b], lens[b:])
        if ref is not None:
            sel = torch.as_tensor(idx, dtype=torch.long)
            inp.ref_chosen, inp.ref_rejected = ref["chosen"][sel].to(lp), ref["rejected"][sel].to(lp)
        return inp

    def train_step(self, items: list, ref, batch: list[int], kl_completions=None) -> dict[str, float]:
        """One optimizer update over ``batch`` (micro batches of preference.micro_batch_size)."""
        cfg = self.cfg
        micro = cfg.preference.micro_batch_size or cfg.preference.batch_size
        self.model.train()

        def loss_of(idx: list[int]):
            losses, stats = self.batch_loss(items, ref, idx, kl_completions, self.train_model)
            return losses.sum() / len(batch), {k: float(v.float().sum()) for k, v in stats.items()}

        sums, lr, gnorm, ok = accumulated_update(batch, micro, loss_of, self.params, self.optimizer, self.scheduler,
                                                 cfg.train.grad_clip, self.dist, self.train_model)
        out = {k: (v if k == "loss" else v / len(batch)) for k, v in sums.items()}
        out.update(grad_norm=float(gnorm), lr=lr, skipped_update=0 if ok else 1, pairs=len(batch))
        return out

    # ----- evaluation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_pairs(self) -> dict[str, Any]:
        """Held-out pairs: implicit-reward accuracy (fraction with margin > 0; the margin is ``beta h`` for
        reference-based losses, the loss's own margin for reference-free ones), mean margin, mean loss, and
        the fraction where the policy gives the chosen completion the higher summed log-prob."""
        items = self.data.eval
        if not items:
            return {"n": 0}
        ref = self.ref["eval"] if self.ref is not None else None
        self.model.eval()
        bs = self.cfg.preference.eval_batch_size
        losses, margins, accs, logp_acc = [], [], [], []
        for s in range(0, len(items), bs):
            idx = list(range(s, min(s + bs, len(items))))
            if isinstance(items[0], TokenizedExample):
                loss, st = self.batch_loss(items, ref, idx, self.eval_kl_completions)
                losses.append(loss), accs.append(st["accuracy"]), margins.append(st["rewards"])
                continue
            inp = self.pair_logps(items, ref, idx)
            logp_acc.append((inp.chosen > inp.rejected).float())
            if self.unpaired:  # KTO evaluated on pairs: DPO's implicit reward beta * h
                m = implicit_reward_margins(inp, self.cfg.preference.beta)
                margins.append(m), accs.append((m > 0).float())
                continue
            loss, st = self.loss_fn(inp, self.cfg.preference)
            losses.append(loss), margins.append(st["margins"]), accs.append(st["accuracy"])
        self.model.train()
        out: dict[str, Any] = {"n": len(items), "accuracy": float(torch.cat(accs).mean()),
                               "margin_mean": float(torch.cat(margins).float().mean())}
        if losses:
            out["loss"] = float(torch.cat(losses).float().mean())
        if logp_acc:
            out["logp_accuracy"] = float(torch.cat(logp_acc).mean())
        return out

    def evaluate(self) -> dict[str, Any]:
        if self.cfg.preference.online:
            from postrl.data import build_messages, render_prompt
            from postrl.eval import heldout_eval

            d = self.cfg.data

            def render(sample):
                return render_prompt(self.tokenizer, build_messages(sample, d.system_prompt, d.prompt_template))

            return heldout_eval(self.backend, self.tokenizer, self.source, self.source.eval, render,
                                self.cfg.resolved_eval_max_new_tokens, self.cfg.eval.batch_size)
        return self.evaluate_pairs()

    # ----- online rounds -------------------------------------------------------------------------------------
    def build_round(self, rnd: int) -> dict[str, Any]:
        """Sample, score and pair the completions of one online round; reference log-probs of its pairs."""
        from postrl.data import build_messages, render_prompt
        from postrl.rollout.generator import sampling_params

        cfg, pf, r = self.cfg, self.cfg.preference, self.cfg.rollout
        rng = random.Random(step_seed(cfg.run.seed, rnd))
        pool = self.source.train
        samples = [pool[i] for i in rng.sample(range(len(pool)), min(pf.prompts_per_round, len(pool)))]
        prompts = []
        for smp in samples:
            ids = render_prompt(self.tokenizer, build_messages(smp, cfg.data.system_prompt, cfg.data.prompt_template))
            prompts.append(ids[max(0, len(ids) - pf.max_prompt_length):])
        rep = [p for p in prompts for _ in range(r.n)]
        gen = self.backend.generate(rep, sampling_params(r), seed=step_seed(cfg.run.seed, rnd), batch_size=r.batch_size)
        comps = [gen.completion_ids[i, :int(gen.completion_mask[i].sum())].tolist() for i in range(len(rep))]
        texts = self.tokenizer.batch_decode(comps, skip_special_tokens=True)
        prompt_texts = self.tokenizer.batch_decode(rep, skip_special_tokens=False)
        res = self.rewards(texts, [s for s in samples for _ in range(r.n)], prompts=prompt_texts, prompt_ids=rep,
                           completion_ids=comps, group_size=r.n)
        pairs, ties = [], 0
        counts = {"truncated_completion": 0}
        for g in range(len(samples)):
            rw = res.total[g * r.n:(g + 1) * r.n]
            pick = (best_worst_pair(rw) if pf.pair_selection == "best_worst"
                    else rso_pair(rw, pf.rso_beta, rng.random))
            if pick is None:
                ties += 1
                continue
            c, j = (g * r.n + pick[0], g * r.n + pick[1])
            if comps[c] == comps[j]:
                ties += 1
                continue
            p, (ci, ri), _, cut = truncate(prompts[g], [comps[c], comps[j]], pf.max_length, pf.max_prompt_length)
            counts["truncated_completion"] += cut
            pairs.append(TokenizedPair(p, ci, ri, 0.0, samples[g].uid))
        info = {"round": rnd + 1, "reward_mean": float(np.mean(res.total)), "reward_std": float(np.std(res.total)),
                "pairs": len(pairs), "groups_skipped_tie": ties, "reward_errors": sum(res.errors.values()),
                **counts}
        ref = None
        if self.needs_ref and pairs:
            ref = self._ref_for(self.ref_model if self.ref_model is not None else self.model, pairs, None)
        self.model.train()
        return {"pairs": pairs, "ref": ref, "info": info}

    # ----- the step ------------------------------------------------------------------------------------------
    def start(self, run) -> None:
        self.run = run
        if self.data is not None and self.needs_ref:
            self.ref = self._reference_cache(run.run_dir, fresh=not self.resumed)

    def results_header(self) -> dict[str, Any]:
        out: dict[str, Any] = {"loss": self.cfg.preference.loss}
        if self.data is not None:
            out["data"] = {"train": len(self.data.train), "eval": len(self.data.eval), **self.data.counts}
        return out

    def _round_updates(self) -> int:
        """Updates of the current online round: preference.epochs passes over its pairs."""
        pf = self.cfg.preference
        return pf.epochs * math.ceil(len(self.round_data["pairs"]) / pf.batch_size)

    def finished(self, step: int) -> bool:
        pf = self.cfg.preference
        if not pf.online:
            return step >= self.total_steps
        while self.round < pf.rounds:  # sample the next round once the current one has had all its updates
            if self.round_data is None:
                self.round_data = self.build_round(self.round)
                self.round_start_step = step
                self.run.results.setdefault("rounds", []).append(self.round_data["info"])
                self.run.write(f"[round {self.round + 1}] " + " ".join(
                    f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in self.round_data["info"].items() if k != "round"))
            if step - self.round_start_step < self._round_updates():
                return False
            self._keep_schedule_in_place()
            self.round += 1
            self.round_data = None
        return True

    def _keep_schedule_in_place(self) -> None:
        """At the end of an online round, move the LR schedule on by the updates the round was planned to have and
        did not (prompts whose completions all tied gave no pair): the schedule is planned over
        ``rounds * epochs * ceil(prompts_per_round / batch_size)`` updates (:meth:`_planned_steps`), so without
        this a run with ties never reaches the schedule's end (a cosine schedule would stop short of its minimum)
        and every later round would train at an earlier round's learning rate."""
        missing = self._planned_round_updates() - self._round_updates()
        if missing <= 0:
            return
        with warnings.catch_warnings():  # a round with no pair at all comes before any optimizer step
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
            for _ in range(missing):
                self.scheduler.step()

    def step(self, run) -> StepOutput:
        """One update: batch ``k`` of epoch ``e`` over the offline pairs, or over the current round's pairs."""
        cfg, pf = self.cfg, self.cfg.preference
        if pf.online:
            items, ref, kl, extra = self.round_data["pairs"], self.round_data["ref"], None, {"round": self.round + 1}
            k = run.state.step - self.round_start_step
        else:
            items, ref, kl, extra = self.data.train, self.ref["train"] if self.ref else None, self.kl_completions, {}
            k = run.state.step
        epoch, b = divmod(k, math.ceil(len(items) / pf.batch_size))
        batch = epoch_batches(len(items), pf.batch_size, cfg.run.seed + self.round * 7_919, epoch)[b]
        t0 = time.time()
        out = self.train_step(items, ref, batch, kl)
        dt = time.time() - t0
        return StepOutput({"epoch": epoch + 1, **extra, **out, "step_time_s": dt,
                           "pairs_per_s": len(batch) / max(dt, 1e-9)}, ok=not out["skipped_update"],
                          updated=out["grad_norm"] > 0)

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "round_start_step": self.round_start_step, "round_data": self.round_data}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round, self.round_start_step = state.get("round", 0), state.get("round_start_step", 0)
        self.round_data = state.get("round_data")

    def describe_eval(self, ev: dict[str, Any]) -> str | None:
        if not ev.get("n"):
            return None
        if self.cfg.preference.online:
            return f"held-out greedy accuracy {ev['accuracy']:.1%} (n={ev['n']})"
        return f"held-out implicit-reward accuracy {ev['accuracy']:.1%}, margin {ev['margin_mean']:.3f} (n={ev['n']} pairs)"

    def close(self) -> None:
        if self.rewards is not None:
            self.rewards.close()
            self.backend.close()


def train_dpo(cfg: Config, resume: str | Path | None = None,
              run_dir: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Run (or resume) ``postrl dpo``; returns ``(run_dir, results)`` (see :func:`postrl.run.run_job`).

    ``results`` holds ``eval_before`` / ``eval_after`` (held-out implicit-reward accuracy and margin; online:
    greedy task accuracy), ``data`` (counts of pairs, skipped and truncated), ``rounds`` (online), ``steps``,
    ``wall_time_s`` and ``final_model`` (``RUN_DIR/final``, a Hugging Face model directory).
    """
    return run_job(PreferenceTrainer, cfg, resume=resume, run_dir=run_dir)
