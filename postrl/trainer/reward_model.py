"""Reward-model training (``postrl rm``): a scalar head on the policy's backbone, Bradley-Terry loss.

    model  = AutoModelForSequenceClassification(num_labels=1) from model.name_or_path (a causal-LM
             checkpoint: the backbone is reused, the score head is new; pad_token_id set so the score is
             read at the last non-pad token)
    pairs  = load_preference_data(cfg)            # same formats, truncation and counting as postrl dpo
    for epoch, batch of preference.batch_size pairs (seeded order):
        r_c, r_r = model(prompt + chosen), model(prompt + rejected)    # one forward of 2B sequences
        loss = mean -log sigmoid(r_c - r_r - margin)                  # margin: the pair's ``margin`` field
        clip; step; log; checkpoint
    held-out pairwise accuracy (r_c > r_r) before / after; RUN_DIR/final = the reward model

The input of the reward model is exactly what ``postrl dpo`` trains on: the prompt rendered with the
chat template (generation prompt included) followed by the completion tokens and EOS. A reward
``{name: reward_model, kwargs: {path: RUN_DIR/final}}`` loads ``RUN_DIR/final`` with
``AutoModelForSequenceClassification.from_pretrained``.

Entry point for other code: :func:`train_rm`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from postrl.algorithms.preference import bradley_terry_loss
from postrl.config import Config, ConfigError, save_config
from postrl.data.pairs import TokenizedPair, load_preference_data
from postrl.models.loading import ModelLoadError, resolve_device, resolve_dtype
from postrl.trainer.checkpoint import load_trainer_state, rng_state, save_checkpoint, set_rng_state
from postrl.trainer.preference import (
    PrefProgress,
    epoch_batches,
    resolve_run_dir,
    right_pad,
    save_final,
    write_json,
)
from postrl.trainer.optim import clipped_step, stop_after_nonfinite_streak
from postrl.trainer.rl import _InterruptFlag, lr_lambda, new_run_dir, seed_everything


def load_reward_model(path: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False):
    """``(model, tokenizer)``: a one-output sequence classifier built from ``path`` (a causal-LM or reward-model
    directory), with ``config.pad_token_id`` set from the tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    dev = resolve_device(device)
    if not Path(path).expanduser().is_dir():
        raise ModelLoadError(f"model.name_or_path={path!r}: postrl rm needs a local model directory (a policy "
                             "checkpoint written by save_pretrained, e.g. an SFT run's final directory)")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=resolve_dtype(dtype, dev), trust_remote_code=trust_remote_code,
            pad_token_id=tok.pad_token_id)
    except Exception as exc:  # noqa: BLE001 - re-raised with guidance
        raise ModelLoadError(f"cannot build a sequence-classification reward model from {path!r}: {exc}") from exc
    model.config.pad_token_id = tok.pad_token_id
    return model.to(dev), tok


class RewardModelTrainer:
    def __init__(self, cfg: Config, init_model: str | None = None, run_dir: Path | None = None,
                 resume: Any = None):
        self.cfg = cfg
        pf, m = cfg.preference, cfg.model
        if pf.online:
            raise ConfigError("preference.online applies to postrl dpo, not postrl rm; set preference.online=false")
        self.run_dir, ckpt = resolve_run_dir(run_dir, resume)
        if cfg.run.threads > 0:
            torch.set_num_threads(cfg.run.threads)
        seed_everything(cfg.run.seed)
        self.model, self.tokenizer = load_reward_model(str(ckpt) if ckpt else (init_model or m.name_or_path),
                                                       m.dtype, m.device, m.trust_remote_code)
        self.pad = self.tokenizer.pad_token_id
        source = None
        if pf.path is None:
            from postrl.trainer.rl import build_data_source

            source = build_data_source(cfg)
        self.data = load_preference_data(cfg, self.tokenizer, source)
        if not isinstance(self.data.train[0], TokenizedPair):
            raise ConfigError("postrl rm needs chosen/rejected pairs; the data is unpaired (prompt/completion/label)")
        t = cfg.train
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
        self.per_epoch = math.ceil(len(self.data.train) / pf.batch_size)
        self.total_steps = pf.epochs * self.per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(t.lr_schedule, t.warmup_steps, self.total_steps))
        self.step, self.results, self.wall_time_s, self.nonfinite, self.consecutive_nonfinite = 0, {}, 0.0, 0, 0
        if ckpt is not None:
            st = load_trainer_state(ckpt)
            self.optimizer.load_state_dict(st["optimizer"])
            self.scheduler.load_state_dict(st["scheduler"])
            set_rng_state(st["rng"])
            self.step, self.results, self.wall_time_s = st["step"], st["results"], st["wall_time_s"]
            self.nonfinite = st.get("nonfinite_total", 0)  # (absent from checkpoints of older versions)
            self.consecutive_nonfinite = st.get("consecutive_nonfinite", 0)
        elif self.run_dir is None:
            self.run_dir = new_run_dir(cfg)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if self.metrics_path.exists():
            keep = [ln for ln in self.metrics_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= self.step]
            self.metrics_path.write_text("".join(ln + "\n" for ln in keep))
        save_config(cfg, self.run_dir / "config.yaml")

    def scores(self, idx: list[int], items: list[TokenizedPair]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(r_chosen, r_rejected, margin)`` of the pairs ``idx``, each ``[b]``."""
        chunk = [items[i] for i in idx]
        seqs = [x.prompt_ids + x.chosen_ids for x in chunk] + [x.prompt_ids + x.rejected_ids for x in chunk]
        ids, mask = right_pad(seqs, self.pad, next(self.model.parameters()).device)
        r = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, 0].float()
        margin = torch.tensor([x.margin for x in chunk], dtype=r.dtype, device=r.device)
        return r[:len(chunk)], r[len(chunk):], margin

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        items = self.data.eval
        if not items:
            return {"n": 0}
        self.model.eval()
        accs, margins, losses = [], [], []
        bs = self.cfg.preference.eval_batch_size
        for s in range(0, len(items), bs):
            rc, rr, mg = self.scores(list(range(s, min(s + bs, len(items)))), items)
            loss, st = bradley_terry_loss(rc, rr, mg if self.cfg.preference.use_margin else None)
            accs.append(st["accuracy"]), margins.append(st["margins"]), losses.append(loss)
        self.model.train()
        return {"n": len(items), "accuracy": float(torch.cat(accs).mean()),
                "margin_mean": float(torch.cat(margins).mean()), "loss": float(torch.cat(losses).mean())}

    def save(self) -> Path:
        state = {"step": self.step, "results": self.results, "wall_time_s": self.wall_time_s,
                 "nonfinite_total": self.nonfinite, "consecutive_nonfinite": self.consecutive_nonfinite,
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng": rng_state()}
        return save_checkpoint(self.run_dir / "checkpoints", self.step, self.model, self.tokenizer, state,
                               keep=self.cfg.train.keep_checkpoints)

    def fit(self) -> dict[str, Any]:
        cfg, pf = self.cfg, self.cfg.preference
        t_start, wall_before = time.time(), self.wall_time_s
        self.results.pop("interrupted", None)
        self.results["data"] = {"train": len(self.data.train), "eval": len(self.data.eval), **self.data.counts}
        if cfg.eval.before and "eval_before" not in self.results:
            self.results["eval_before"] = self.evaluate()
            write_json(self.run_dir / "results.json", self.results)
        micro = pf.micro_batch_size or pf.batch_size
        interrupted = False
        with _InterruptFlag() as stop, PrefProgress(self.total_steps, self.step, cfg.run.progress) as progress:
            while self.step < self.total_steps:
                epoch, b = divmod(self.step, self.per_epoch)
                batch = epoch_batches(len(self.data.train), pf.batch_size, cfg.run.seed, epoch)[b]
                t0 = time.time()
                self.model.train()
                self.optimizer.zero_grad(set_to_none=True)
                sums = {"loss": 0.0, "accuracy": 0.0, "margins": 0.0}
                finite = True
                for s in range(0, len(batch), micro):
                    rc, rr, mg = self.scores(batch[s:s + micro], self.data.train)
                    losses, st = bradley_terry_loss(rc, rr, mg if pf.use_margin else None)
                    loss = losses.sum() / len(batch)
                    if not torch.isfinite(loss):
                        finite = False
                        break
                    loss.backward()
                    sums["loss"] += float(loss.detach())
                    sums["accuracy"] += float(st["accuracy"].sum()) / len(batch)
                    sums["margins"] += float(st["margins"].sum()) / len(batch)
                lr = self.scheduler.get_last_lr()[0]
                gnorm, ok = clipped_step(self.params, self.optimizer, cfg.train.grad_clip, finite)
                if ok:
                    self.consecutive_nonfinite = 0
                else:
                    self.consecutive_nonfinite += 1
                    self.nonfinite += 1
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.step += 1
                dt = time.time() - t0
                record = {"step": self.step, "epoch": epoch + 1, **sums, "grad_norm": float(gnorm), "lr": lr,
                          "skipped_update": 0 if ok else 1, "step_time_s": dt, "pairs_per_s": len(batch) / dt}
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                progress.update(record)
                stop_after_nonfinite_streak(self.consecutive_nonfinite, cfg.train.max_nonfinite_steps, self.step,
                                            self.run_dir / "checkpoints", "updates")
                self.wall_time_s = wall_before + time.time() - t_start
                if cfg.train.save_every and self.step % cfg.train.save_every == 0:
                    self.save()
                if stop.requested:
                    interrupted = True
                    break
        self.wall_time_s = wall_before + time.time() - t_start
        if interrupted:
            self.results["interrupted"] = True
            self.save()
            write_json(self.run_dir / "results.json", self.results)
            return self.results
        if cfg.eval.after:
            self.results["eval_after"] = self.evaluate()
        self.results.update(steps=self.step, wall_time_s=self.wall_time_s, nonfinite_steps=self.nonfinite)
        self.save()
        self.results["final_model"] = str(save_final(self.model, self.tokenizer, self.run_dir))
        write_json(self.run_dir / "results.json", self.results)
        if cfg.run.progress and self.results.get("eval_after", {}).get("n"):
            ev = self.results["eval_after"]
            print(f"[eval] after training: held-out pairwise accuracy {ev['accuracy']:.1%} (n={ev['n']})", flush=True)
        return self.results


def train_rm(cfg: Config, init_model: str | None = None, run_dir: Path | None = None,
             resume: str | Path | bool | None = None) -> tuple[Path, dict[str, Any]]:
    """Train (or resume) a reward model; returns ``(run_dir, results)``.

    Arguments as :func:`postrl.trainer.preference.train_dpo`. ``results`` holds ``eval_before`` /
    ``eval_after`` (held-out pairwise accuracy, mean margin ``r_c - r_r``, loss), ``data`` counts, ``steps``,
    ``wall_time_s`` and ``final_model`` (``RUN_DIR/final``, loadable with
    ``AutoModelForSequenceClassification.from_pretrained``).
    """
    trainer = RewardModelTrainer(cfg, init_model=init_model, run_dir=run_dir, resume=resume)
    return trainer.run_dir, trainer.fit()
