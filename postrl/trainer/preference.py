"""Preference optimization (``postrl dpo``): the DPO family, offline and online / iterative.

Offline, top to bottom::

    pairs  = load_preference_data(cfg)                 # tokenized, truncated, bad input counted
    ref    = reference log-probs of every train and held-out pair, computed ONCE with the initial
             policy before any update (RUN_DIR/ref_logps.pt; skipped for reference-free losses)
    eval before: held-out implicit-reward accuracy and margin
    for epoch, batch of preference.batch_size pairs (order: a permutation seeded by (seed, epoch)):
        for micro batch: logps of chosen and rejected in one forward (2B rows)
                         loss = mean_B preference_loss(PairLogps(logps, ref), cfg.algo); backward
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
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
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
from postrl.config import Config, ConfigError, save_config
from postrl.data.pairs import (
    PreferenceData,
    TokenizedExample,
    TokenizedPair,
    as_unpaired,
    data_fingerprint,
    load_preference_data,
    truncate,
)
from postrl.models.loading import load_model_and_tokenizer
from postrl.models.logprobs import completion_logprobs
from postrl.trainer.checkpoint import latest_checkpoint, load_trainer_state, rng_state, save_checkpoint, set_rng_state
from postrl.trainer.optim import clipped_step, stop_after_nonfinite_streak
from postrl.trainer.progress import Progress
from postrl.trainer.rl import TrainingError, _InterruptFlag, lr_lambda, new_run_dir, seed_everything, step_seed

log = logging.getLogger(__name__)

REF_FILE = "ref_logps.pt"


# ------------------------------------------------------------------------------------------------------------
# Shared with the reward-model trainer
# ------------------------------------------------------------------------------------------------------------


class PrefProgress(Progress):
    FIELDS = (("loss", "loss", "{:.4f}"), ("acc", "accuracy", "{:.2f}"), ("margin", "margins", "{:.3f}"),
              ("round", "round", "{}"), ("pairs/s", "pairs_per_s", "{:.1f}"))


def resolve_run_dir(run_dir: Path | None, resume: Any) -> tuple[Path | None, Path | None]:
    """``(run_dir, checkpoint)`` for the ``run_dir`` / ``resume`` arguments of the entry points.

    ``resume`` a path: continue that run from its latest checkpoint (an error if it has none).
    ``resume=True``: continue ``run_dir`` if it has a checkpoint, else start fresh there.
    Otherwise: start fresh in ``run_dir`` (None = a new ``run.output_dir/run.name[-N]``, made later).
    """
    if resume is not None and resume is not False:
        if resume is True:
            if run_dir is None:
                raise TrainingError("resume=True needs a run_dir to resume")
            return Path(run_dir), latest_checkpoint(Path(run_dir) / "checkpoints")
        rd = Path(resume)
        ckpt = latest_checkpoint(rd / "checkpoints")
        if ckpt is None:
            raise TrainingError(f"--resume {resume}: no complete checkpoint under {rd / 'checkpoints'}")
        return rd, ckpt
    return (Path(run_dir) if run_dir is not None else None), None


def right_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a permutation of ``range(n)`` seeded by (seed, epoch), cut into batches of
    ``batch_size`` (the last one may be smaller)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, 1_000 + epoch))).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    tmp.replace(path)


def save_final(model, tokenizer, run_dir: Path) -> Path:
    """``RUN_DIR/final``: the trained model as a plain Hugging Face directory (written then renamed)."""
    import shutil
    import tempfile

    final = run_dir / "final"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-final-", dir=run_dir))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.replace(final)
    return final


# ------------------------------------------------------------------------------------------------------------
# Log-probs
# ------------------------------------------------------------------------------------------------------------


def sequence_logps(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each completion given its prompt, and the completion lengths; both ``[B]``."""
    device = next(model.parameters()).device
    ids, mask = right_pad(completions, pad_id, device)
    lp, _ = completion_logprobs(model, prompts, ids, mask, pad_id)
    return lp.sum(-1), mask.sum(-1).to(lp.dtype)


@dataclass
class RunState:
    step: int = 0
    round: int = 0
    round_start_step: int = 0
    round_data: dict[str, Any] | None = None
    consecutive_nonfinite: int = 0
    nonfinite_total: int = 0
    results: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0


class PreferenceTrainer:
    """Holds one ``postrl dpo`` run; :meth:`fit` is the loop."""

    def __init__(self, cfg: Config, init_model: str | None = None, run_dir: Path | None = None,
                 resume: Any = None):
        self.cfg = cfg
        a, pf, m = cfg.algo, cfg.preference, cfg.model
        try:
            self.loss_fn = PREFERENCE_LOSSES.get_fn(a.preference_loss)
        except KeyError as exc:
            raise ConfigError(exc.args[0]) from None
        self.unpaired = bool(getattr(self.loss_fn, "unpaired", False))
        self.needs_ref = bool(getattr(self.loss_fn, "needs_reference", True))
        if pf.online and self.unpaired:
            raise ConfigError("preference.online builds chosen/rejected pairs; algo.preference_loss=kto is for "
                              "offline unpaired data. Use a paired loss (dpo, ipo, ...) online.")
        if pf.online:
            from postrl.rewards import resolve_reward

            for spec in cfg.rewards:
                resolve_reward(spec.name)
        self.run_dir, ckpt = resolve_run_dir(run_dir, resume)
        if cfg.run.threads > 0:
            torch.set_num_threads(cfg.run.threads)
        seed_everything(cfg.run.seed)
        self.init_source = init_model or m.name_or_path
        load = dict(dtype=m.dtype, device=m.device, revision=m.revision, offline_fallback=m.offline_fallback,
                    cache_dir=m.cache_dir, trust_remote_code=m.trust_remote_code)
        self.model, self.tokenizer, self.model_source = load_model_and_tokenizer(
            str(ckpt) if ckpt else self.init_source, **load)
        self.pad = self.tokenizer.pad_token_id
        self.device = next(self.model.parameters()).device

        self.source = None
        if pf.online or pf.path is None:
            from postrl.trainer.rl import build_data_source

            self.source = build_data_source(cfg)
        self.data: PreferenceData | None = None
        if not pf.online:
            self.data = load_preference_data(cfg, self.tokenizer, self.source)
            if self.unpaired and isinstance(self.data.train[0], TokenizedPair):
                # KTO on pairs: chosen -> desirable, rejected -> undesirable; held-out pairs stay pairs and are
                # evaluated with the implicit reward beta * h
                self.data.train = as_unpaired(self.data.train)
            elif not self.unpaired and not isinstance(self.data.train[0], TokenizedPair):
                raise ConfigError(f"algo.preference_loss={a.preference_loss} needs chosen/rejected pairs, but the "
                                  "data is unpaired (prompt/completion/label); use algo.preference_loss=kto.")
            self.kl_completions = self._mismatched(self.data.train) if self.unpaired else None
            self.eval_kl_completions = (self._mismatched(self.data.eval) if self.unpaired and self.data.eval
                                        and isinstance(self.data.eval[0], TokenizedExample) else None)

        t = cfg.train
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
        self.total_steps = self._planned_steps()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(t.lr_schedule, t.warmup_steps, self.total_steps))
        self.state = RunState()
        self.ref_model = None
        if pf.online:
            from postrl.rewards import RewardContext, RewardPipeline
            from postrl.rollout.generator import Generator, eos_token_ids

            self.rewards = RewardPipeline(cfg.rewards, self.source, cfg.scoring, RewardContext(
                source=self.source, tokenizer=self.tokenizer, device=self.device))
            self.generator = Generator(self.model, eos_token_ids(self.model, self.tokenizer), self.pad)
            if self.needs_ref and pf.online_reference == "initial":
                self.ref_model = (copy.deepcopy(self.model) if ckpt is None
                                  else load_model_and_tokenizer(self.init_source, **load)[0])
                self.ref_model.eval().requires_grad_(False)
        else:
            self.rewards = None
        if ckpt is not None:
            self._load_state(ckpt)
        elif self.run_dir is None:
            self.run_dir = new_run_dir(cfg)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._truncate_metrics(self.state.step)
        save_config(cfg, self.run_dir / "config.yaml")
        self.ref: dict[str, dict[str, torch.Tensor]] | None = None
        if not pf.online and self.needs_ref:
            self.ref = self._reference_cache(fresh=ckpt is None)

    # ----- setup helpers -------------------------------------------------------------------------------------
    def _planned_steps(self) -> int:
        pf = self.cfg.preference
        if pf.online:
            return pf.rounds * pf.epochs * math.ceil(pf.prompts_per_round / pf.batch_size)
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

    def _truncate_metrics(self, step: int) -> None:
        if self.metrics_path.exists():
            keep = [ln for ln in self.metrics_path.read_text().splitlines() if ln.strip()
                    and json.loads(ln).get("step", 0) <= step]
            self.metrics_path.write_text("".join(ln + "\n" for ln in keep))

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

    def _reference_cache(self, fresh: bool) -> dict[str, dict[str, torch.Tensor]]:
        """Reference log-probs of the train and held-out sets, computed once with the initial policy (before any
        update) and kept in RUN_DIR/ref_logps.pt, so a resumed run neither recomputes them nor needs the initial
        model."""
        path = self.run_dir / REF_FILE
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
        cache = {"fingerprint": fp, "train": self._ref_for(self.model, self.data.train, self.kl_completions),
                 "eval": self._ref_for(self.model, self.data.eval, self.eval_kl_completions)}
        torch.save(cache, path)
        log.info("reference log-probs of %d + %d items in %.1fs", len(self.data.train), len(self.data.eval),
                 time.time() - t0)
        self.state.results["ref_logps_time_s"] = time.time() - t0
        return cache

    # ----- one batch -----------------------------------------------------------------------------------------
    def batch_loss(self, items: list, ref: dict[str, torch.Tensor] | None, idx: list[int],
                   kl_completions: list[list[int]] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-item losses ``[b]`` and stats of the items ``idx`` under the current policy (differentiable)."""
        a = self.cfg.algo
        if not self.unpaired:
            return self.loss_fn(self.pair_logps(items, ref, idx), a)
        chunk = [items[i] for i in idx]
        prompts = [x.prompt_ids for x in chunk]
        sel = torch.as_tensor(idx, dtype=torch.long)
        lp, _ = sequence_logps(self.model, prompts, [x.completion_ids for x in chunk], self.pad)
        with torch.no_grad():
            kl_lp, _ = sequence_logps(self.model, prompts, [kl_completions[i] for i in idx], self.pad)
        desirable = torch.tensor([x.desirable for x in chunk], device=lp.device)
        inp = UnpairedLogps(lp, ref["logps"][sel].to(lp), desirable, kl_lp, ref["kl"][sel].to(lp))
        return self.loss_fn(inp, a)

    def pair_logps(self, items: list, ref: dict[str, torch.Tensor] | None, idx: list[int]) -> PairLogps:
        """Summed log-probs of the chosen and rejected completions of pairs ``idx`` under the current policy
        (one forward over both), with their cached reference log-probs when there is a reference."""
        chunk = [items[i] for i in idx]
        prompts = [x.prompt_ids for x in chunk]
        lp, lens = sequence_logps(self.model, prompts + prompts,
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
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        finite = True
        for s in range(0, len(batch), micro):
            idx = batch[s:s + micro]
            losses, stats = self.batch_loss(items, ref, idx, kl_completions)
            loss = losses.sum() / len(batch)
            if not torch.isfinite(loss):
                finite = False
                break
            loss.backward()
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v.float().sum())
        lr = self.scheduler.get_last_lr()[0]
        gnorm, ok = clipped_step(self.params, self.optimizer, cfg.train.grad_clip, finite)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
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
                m = implicit_reward_margins(inp, self.cfg.algo.beta)
                margins.append(m), accs.append((m > 0).float())
                continue
            loss, st = self.loss_fn(inp, self.cfg.algo)
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

            return heldout_eval(self.generator, self.tokenizer, self.source, self.source.eval, render,
                                self.cfg.resolved_eval_max_new_tokens, self.cfg.eval.batch_size)
        return self.evaluate_pairs()

    # ----- online rounds -------------------------------------------------------------------------------------
    def build_round(self, rnd: int) -> dict[str, Any]:
        """Sample, score and pair the completions of one online round; reference log-probs of its pairs."""
        from postrl.data import build_messages, render_prompt
        from postrl.rollout.generator import SamplingParams

        cfg, pf, r = self.cfg, self.cfg.preference, self.cfg.rollout
        rng = random.Random(step_seed(cfg.run.seed, rnd))
        pool = self.source.train
        samples = [pool[i] for i in rng.sample(range(len(pool)), min(pf.prompts_per_round, len(pool)))]
        prompts = []
        for smp in samples:
            ids = render_prompt(self.tokenizer, build_messages(smp, cfg.data.system_prompt, cfg.data.prompt_template))
            prompts.append(ids[max(0, len(ids) - pf.max_prompt_length):])
        rep = [p for p in prompts for _ in range(r.n)]
        self.model.eval()
        gen = self.generator.generate(rep, SamplingParams(r.max_new_tokens, r.temperature, r.top_p, r.top_k),
                                      seed=step_seed(cfg.run.seed, rnd), batch_size=r.batch_size)
        comps = [gen.completion_ids[i, :int(gen.completion_mask[i].sum())].tolist() for i in range(len(rep))]
        texts = self.tokenizer.batch_decode(comps, skip_special_tokens=True)
        prompt_texts = self.tokenizer.batch_decode(rep, skip_special_tokens=False)
        res = self.rewards(texts, [s for s in samples for _ in range(r.n)], prompts=prompt_texts,
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

    # ----- checkpoints ---------------------------------------------------------------------------------------
    def save(self) -> Path:
        s = self.state
        state = {"step": s.step, "round": s.round, "round_start_step": s.round_start_step,
                 "round_data": s.round_data, "consecutive_nonfinite": s.consecutive_nonfinite,
                 "nonfinite_total": s.nonfinite_total, "results": s.results, "wall_time_s": s.wall_time_s,
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng": rng_state()}
        return save_checkpoint(self.run_dir / "checkpoints", s.step, self.model, self.tokenizer, state,
                               keep=self.cfg.train.keep_checkpoints)

    def _load_state(self, ckpt: Path) -> None:
        st = load_trainer_state(ckpt)
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        set_rng_state(st["rng"])
        self.state = RunState(step=st["step"], round=st["round"], round_start_step=st["round_start_step"],
                              round_data=st["round_data"], consecutive_nonfinite=st["consecutive_nonfinite"],
                              nonfinite_total=st["nonfinite_total"], results=st["results"],
                              wall_time_s=st["wall_time_s"])

    def _write_results(self) -> None:
        write_json(self.run_dir / "results.json", self.state.results)

    # ----- the loop ------------------------------------------------------------------------------------------
    def _run_epochs(self, items, ref, kl_completions, first_step: int, progress, stop, extra: dict) -> bool:
        """Train ``preference.epochs`` over ``items``; updates are numbered from ``first_step`` (so a resumed run
        skips the ones done). Returns False when interrupted."""
        cfg, pf = self.cfg, self.cfg.preference
        per_epoch = math.ceil(len(items) / pf.batch_size)
        for k in range(self.state.step - first_step, pf.epochs * per_epoch):
            epoch, b = divmod(k, per_epoch)
            batch = epoch_batches(len(items), pf.batch_size, cfg.run.seed + self.state.round * 7_919, epoch)[b]
            t0 = time.time()
            out = self.train_step(items, ref, batch, kl_completions)
            dt = time.time() - t0
            s = self.state
            if out["skipped_update"]:
                s.consecutive_nonfinite += 1
                s.nonfinite_total += 1
            else:
                s.consecutive_nonfinite = 0
            s.step += 1
            record = {"step": s.step, "epoch": epoch + 1, **extra, **out, "step_time_s": dt,
                      "pairs_per_s": len(batch) / max(dt, 1e-9), "nonfinite_steps": s.nonfinite_total}
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            progress.update(record)
            stop_after_nonfinite_streak(s.consecutive_nonfinite, cfg.train.max_nonfinite_steps, s.step,
                                        self.run_dir / "checkpoints", "updates")
            if cfg.train.save_every and s.step % cfg.train.save_every == 0:
                self.save()
            if stop.requested:
                return False
        return True

    def fit(self) -> dict[str, Any]:
        cfg, pf, s = self.cfg, self.cfg.preference, self.state
        t_start, wall_before = time.time(), s.wall_time_s
        s.results.pop("interrupted", None)
        s.results["loss"] = cfg.algo.preference_loss
        if self.data is not None:
            s.results["data"] = {"train": len(self.data.train), "eval": len(self.data.eval),
                                 **{k: v for k, v in self.data.counts.items()}}
        if cfg.eval.before and "eval_before" not in s.results:
            s.results["eval_before"] = self.evaluate()
            self._write_results()
            self._print_eval("before", s.results["eval_before"])
        progress = PrefProgress(total=self.total_steps, initial=s.step, enabled=cfg.run.progress)
        completed = True
        with _InterruptFlag() as stop, progress:
            if not pf.online:
                completed = self._run_epochs(self.data.train, self.ref["train"] if self.ref else None,
                                             self.kl_completions, 0, progress, stop, {})
            else:
                while s.round < pf.rounds:
                    if s.round_data is None:
                        s.round_data = self.build_round(s.round)
                        s.round_start_step = s.step
                        s.results.setdefault("rounds", []).append(s.round_data["info"])
                        progress.write(f"[round {s.round + 1}] " + " ".join(
                            f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in s.round_data["info"].items() if k != "round"))
                    rd = s.round_data
                    if rd["pairs"]:
                        completed = self._run_epochs(rd["pairs"], rd["ref"], None, s.round_start_step, progress,
                                                     stop, {"round": s.round + 1})
                    if not completed:
                        break
                    s.round += 1
                    s.round_data = None
        s.wall_time_s = wall_before + time.time() - t_start
        if not completed:
            s.results["interrupted"] = True
            path = self.save()
            self._write_results()
            progress.write(f"[postrl] interrupted at step {s.step}; checkpoint {path}. Resume with: postrl dpo "
                           f"{self.run_dir / 'config.yaml'} --resume {self.run_dir}")
            return s.results
        if cfg.eval.after:
            s.results["eval_after"] = self.evaluate()
            self._print_eval("after", s.results["eval_after"])
        s.results.update(steps=s.step, wall_time_s=s.wall_time_s, nonfinite_steps=s.nonfinite_total)
        self.save()
        s.results["final_model"] = str(save_final(self.model, self.tokenizer, self.run_dir))
        self._write_results()
        return s.results

    def _print_eval(self, when: str, ev: dict[str, Any]) -> None:
        if not self.cfg.run.progress or not ev.get("n"):
            return
        if self.cfg.preference.online:
            print(f"[eval] {when} training: held-out greedy accuracy {ev['accuracy']:.1%} (n={ev['n']})", flush=True)
        else:
            print(f"[eval] {when} training: held-out implicit-reward accuracy {ev['accuracy']:.1%}, "
                  f"margin {ev['margin_mean']:.3f} (n={ev['n']} pairs)", flush=True)

    def close(self) -> None:
        if self.rewards is not None:
            self.rewards.close()


def train_dpo(cfg: Config, init_model: str | None = None, run_dir: Path | None = None,
              resume: str | Path | bool | None = None) -> tuple[Path, dict[str, Any]]:
    """Run (or resume) ``postrl dpo``; returns ``(run_dir, results)``.

    init_model: model to start from instead of ``cfg.model.name_or_path`` (e.g. the previous pipeline
                stage's ``final`` directory); it is also the reference model.
    run_dir:    write into this directory (created if needed) instead of a new ``run.output_dir/run.name``.
    resume:     a run directory to continue from its latest checkpoint, or True to continue ``run_dir``
                when it has a checkpoint (and start fresh there when it has none).

    ``results`` holds ``eval_before`` / ``eval_after`` (held-out implicit-reward accuracy and margin; online:
    greedy task accuracy), ``data`` (counts of pairs, skipped and truncated), ``rounds`` (online), ``steps``,
    ``wall_time_s`` and ``final_model`` (``RUN_DIR/final``, a Hugging Face model directory).
    """
    trainer = PreferenceTrainer(cfg, init_model=init_model, run_dir=run_dir, resume=resume)
    try:
        return trainer.run_dir, trainer.fit()
    finally:
        trainer.close()
