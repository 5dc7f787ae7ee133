"""The SFT loop: maximum likelihood of the completion tokens, top to bottom.

    rows      = tokenize(records) -> truncate -> (pack)                  # postrl.data.sft
    for step in epochs x ceil(rows / sft.batch_size):
        batch = rows of this step (order reshuffled each epoch with the run seed)
        for micro batch: loss = sum of -log p(target) over completion tokens / tokens in the batch; backward
        clip grads; optimizer.step(); scheduler.step()
        log metrics; checkpoint; periodic held-out loss

Same conventions as ``postrl train``: ``RUN/config.yaml``, ``metrics.jsonl`` (one row per step),
``results.json`` (held-out loss before / after, data counts), atomic ``checkpoints/step_N`` (a Hugging Face
model directory + ``trainer_state.pt``), exact resume, Ctrl-C checkpoints and stops.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch

from postrl.config import Config
from postrl.data.sft import (
    SFTExample,
    SFTStats,
    collate,
    collate_packed,
    demonstrations_from_source,
    pack,
    read_records,
    split_records,
    tokenize_records,
)
from postrl.models.loading import load_model_and_tokenizer
from postrl.models.logprobs import token_logprobs
from postrl.trainer.checkpoint import latest_checkpoint, load_trainer_state, rng_state, save_checkpoint, set_rng_state
from postrl.trainer.progress import Progress
from postrl.trainer.optim import clipped_step, stop_after_nonfinite_streak
from postrl.trainer.rl import (
    RunState,
    TrainingError,
    _InterruptFlag,
    build_data_source,
    lr_lambda,
    new_run_dir,
    seed_everything,
    step_seed,
)

log = logging.getLogger(__name__)


def sft_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood ``-log p(x_t | x_<t)`` of the targets, zero where ``loss_mask`` is 0.

    logits [B, T, V] (position t predicts token t+1), input_ids [B, T], loss_mask [B, T] (1 = token t is a
    target). Returns [B, T] with column 0 always 0 (no position predicts the first token). This is the
    maximum-likelihood objective of supervised fine-tuning on demonstrations (Ouyang et al. 2022,
    "Training language models to follow instructions with human feedback", Sec. 3.5: SFT), restricted to
    the completion tokens.
    """
    target_lp = token_logprobs(logits[:, :-1].float(), input_ids[:, 1:])  # no [B, T, V] log-softmax tensor
    nll = torch.zeros(input_ids.shape, dtype=target_lp.dtype, device=logits.device)
    nll[:, 1:] = -target_lp * loss_mask[:, 1:].to(target_lp.dtype)
    return nll


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
             num_tokens: Optional[float] = None) -> torch.Tensor:
    """Masked mean NLL: ``sum_t mask_t * -log p(x_t | x_<t) / num_tokens`` (scalar).

    ``num_tokens`` defaults to ``loss_mask[:, 1:].sum()``; the trainer passes the target count of the whole
    mini batch, so the loss of an update does not depend on how it is split into micro batches (token mean
    over the batch, as TRL's SFTTrainer). See :func:`sft_token_nll` for shapes and the reference.
    """
    if num_tokens is None:
        num_tokens = float(loss_mask[:, 1:].sum())
    return sft_token_nll(logits, input_ids, loss_mask).sum() / max(num_tokens, 1.0)


class _SFTProgress(Progress):
    FIELDS = (("loss", "loss", "{:.4f}"), ("lr", "lr", "{:.2e}"), ("tok/s", "tokens_per_s", "{:.0f}"))


class SFTTrainer:
    """Holds the pieces of one SFT run; :meth:`fit` is the loop."""

    def __init__(self, cfg: Config, resume: str | Path | None = None, run_dir: str | Path | None = None):
        self.cfg = cfg
        ckpt = None
        if resume is not None:
            self.run_dir = Path(resume)
            ckpt = latest_checkpoint(self.run_dir / "checkpoints")
            if ckpt is None:
                raise TrainingError(f"--resume {resume}: no complete checkpoint under {self.run_dir / 'checkpoints'}")
        if cfg.run.threads > 0:
            torch.set_num_threads(cfg.run.threads)
        seed_everything(cfg.run.seed)
        m = cfg.model
        self.model, self.tokenizer, self.model_source = load_model_and_tokenizer(
            str(ckpt) if ckpt else m.name_or_path, dtype=m.dtype, device=m.device, revision=m.revision,
            offline_fallback=m.offline_fallback, cache_dir=m.cache_dir, trust_remote_code=m.trust_remote_code)
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.stats = {"train": SFTStats(), "eval": SFTStats()}
        self.train_examples, self.eval_examples = self._load_data()
        s = cfg.sft
        rows: list[list[SFTExample]] = (pack(self.train_examples, s.max_length) if s.packing
                                        else [[e] for e in self.train_examples])
        self.rows = rows
        self.steps_per_epoch = math.ceil(len(rows) / s.batch_size)
        self.total_steps = s.epochs * self.steps_per_epoch
        if s.max_steps:
            self.total_steps = min(self.total_steps, s.max_steps)

        t = cfg.train
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(t.lr_schedule, t.warmup_steps, self.total_steps))
        self.state = RunState()
        if ckpt is not None:
            self._load_state(ckpt)
        else:  # created only now, so that a config, data or model error leaves no empty run directory behind
            self.run_dir = new_run_dir(cfg, run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._truncate_metrics(self.state.step)
        from postrl.config import save_config

        save_config(cfg, self.run_dir / "config.yaml")

    # ----- data ----------------------------------------------------------------------------------------------
    def _load_data(self) -> tuple[list[SFTExample], list[SFTExample]]:
        cfg, s = self.cfg, self.cfg.sft
        seed = cfg.resolved_data_seed
        if s.path is None:  # demonstrations from the prompt source of `data`
            source = build_data_source(cfg)
            d = cfg.data
            train = demonstrations_from_source(source.train, d.system_prompt, d.prompt_template, s.completion_template)
            held = demonstrations_from_source(source.eval, d.system_prompt, d.prompt_template, s.completion_template)
        else:
            train = read_records(s.path, s.split)
            if s.eval_path is not None:
                held = read_records(s.eval_path, s.eval_split or s.split)[: s.eval_size or None]
            elif s.eval_split is not None:
                held = read_records(s.path, s.eval_split)[: s.eval_size or None]
            else:
                train, held = split_records(train, s.eval_size, seed)
        if s.train_size:
            train = train[: s.train_size]
        tok = self.tokenizer
        train_ex = tokenize_records(tok, train, s.max_length, self.stats["train"])
        eval_ex = tokenize_records(tok, held, s.max_length, self.stats["eval"])
        if not train_ex:
            raise TrainingError(f"no SFT training example left ({len(train)} read, "
                                f"{self.stats['train'].dropped_too_long} dropped as longer than sft.max_length)")
        return train_ex, eval_ex

    def batch_rows(self, step: int) -> list[list[SFTExample]]:
        """Rows of optimizer step ``step``: epoch ``step // steps_per_epoch``, order a function of (seed, epoch)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(step_seed(self.cfg.run.seed, epoch) + 3)
        order = torch.randperm(len(self.rows), generator=g).tolist()
        b = self.cfg.sft.batch_size
        return [self.rows[i] for i in order[k * b:(k + 1) * b]]

    def _tensors(self, rows: list[list[SFTExample]]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        if self.cfg.sft.packing:
            out = collate_packed(rows, pad, dtype=self.dtype)
        else:
            out = collate([r[0] for r in rows], pad)
        return {k: v.to(self.device) for k, v in out.items()}

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        kwargs: dict[str, Any] = {"attention_mask": batch["attention_mask"]}
        if "position_ids" in batch:
            kwargs["position_ids"] = batch["position_ids"]
        return self.model(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits

    # ----- one step ------------------------------------------------------------------------------------------
    def update(self, rows: list[list[SFTExample]]) -> dict[str, float]:
        micro = self.cfg.sft.micro_batch_size or self.cfg.sft.batch_size
        n_tokens = float(sum(sum(e.loss_mask) for r in rows for e in r))
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total, finite = 0.0, True
        for start in range(0, len(rows), micro):
            batch = self._tensors(rows[start:start + micro])
            loss = sft_loss(self._forward(batch), batch["input_ids"], batch["loss_mask"], n_tokens)
            if not torch.isfinite(loss):
                finite = False
                break
            loss.backward()
            total += float(loss.detach())
        lr = self.scheduler.get_last_lr()[0]
        gnorm, ok = clipped_step(self.params, self.optimizer, self.cfg.train.grad_clip, finite)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return {"loss": total if ok else float("nan"), "grad_norm": float(gnorm), "lr": lr, "ok": ok,
                "target_tokens": n_tokens, "tokens": float(sum(len(e) for r in rows for e in r))}

    @torch.no_grad()
    def evaluate(self, examples: Optional[list[SFTExample]] = None) -> dict[str, Any]:
        """Held-out mean NLL per completion token (and its exp, the perplexity), unpacked."""
        examples = self.eval_examples if examples is None else examples
        if not examples:
            return {"loss": float("nan"), "perplexity": float("nan"), "n": 0, "tokens": 0}
        self.model.eval()
        total, tokens = 0.0, 0.0
        bs = max(1, self.cfg.eval.batch_size)
        for start in range(0, len(examples), bs):
            batch = {k: v.to(self.device) for k, v in collate(examples[start:start + bs],
                                                              self.tokenizer.pad_token_id).items()}
            total += float(sft_token_nll(self._forward(batch), batch["input_ids"], batch["loss_mask"]).sum())
            tokens += float(batch["loss_mask"][:, 1:].sum())
        loss = total / max(tokens, 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "n": len(examples), "tokens": int(tokens)}

    # ----- state ---------------------------------------------------------------------------------------------
    def _truncate_metrics(self, step: int) -> None:
        if self.metrics_path.exists():
            lines = [ln for ln in self.metrics_path.read_text().splitlines()
                     if ln.strip() and json.loads(ln).get("step", 0) <= step]
            self.metrics_path.write_text("".join(ln + "\n" for ln in lines))

    def _write_results(self) -> None:
        path = self.run_dir / "results.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.state.results, indent=2))
        os.replace(tmp, path)

    def trainer_state(self) -> dict[str, Any]:
        return {"run_state": self.state.__dict__.copy(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": rng_state(), "kind": "sft"}

    def _load_state(self, ckpt: Path) -> None:
        try:
            st = load_trainer_state(ckpt)
            self.state = RunState(**st["run_state"])
            self.optimizer.load_state_dict(st["optimizer"])
            self.scheduler.load_state_dict(st["scheduler"])
            set_rng_state(st["rng"])
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise TrainingError(
                f"--resume {self.run_dir}: cannot restore the trainer state of {ckpt}: {exc}. Resume with the "
                f"run's own config ({self.run_dir / 'config.yaml'}); only settings such as sft.epochs may change."
            ) from exc

    def save(self) -> Path:
        return save_checkpoint(self.run_dir / "checkpoints", self.state.step, self.model, self.tokenizer,
                               self.trainer_state(), keep=self.cfg.train.keep_checkpoints)

    # ----- the loop ------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        t_start, wall_before = time.time(), self.state.wall_time_s
        res = self.state.results
        res.pop("interrupted", None)
        res["data"] = {k: v.as_dict() for k, v in self.stats.items()}
        res["data"]["train_rows"] = len(self.rows)
        res["total_steps"] = self.total_steps
        if cfg.eval.before and "eval_before" not in res:
            res["eval_before"] = self.evaluate()
            self._write_results()
            if cfg.run.progress:
                print(f"[eval] before SFT: held-out completion loss {res['eval_before']['loss']:.4f}", flush=True)
        progress = _SFTProgress(total=self.total_steps, initial=self.state.step, enabled=cfg.run.progress)
        interrupted = False
        with _InterruptFlag() as stop, progress:
            while self.state.step < self.total_steps:
                step = self.state.step
                t0 = time.time()
                upd = self.update(self.batch_rows(step))
                dt = time.time() - t0
                if upd["ok"]:
                    self.state.consecutive_nonfinite = 0
                else:
                    self.state.consecutive_nonfinite += 1
                    self.state.nonfinite_total += 1
                self.state.step = step + 1
                record = {"step": self.state.step, "epoch": step // self.steps_per_epoch, "loss": upd["loss"],
                          "grad_norm": upd["grad_norm"], "lr": upd["lr"], "target_tokens": upd["target_tokens"],
                          "tokens": upd["tokens"], "tokens_per_s": upd["tokens"] / max(dt, 1e-9),
                          "step_time_s": dt, "nonfinite_steps": self.state.nonfinite_total}
                if cfg.eval.every and self.state.step % cfg.eval.every == 0 and self.state.step < self.total_steps:
                    ev = self.evaluate()
                    record["eval/loss"] = ev["loss"]
                    res.setdefault("eval_during", []).append({"step": self.state.step, **ev})
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                progress.update(record)
                stop_after_nonfinite_streak(self.state.consecutive_nonfinite, cfg.train.max_nonfinite_steps,
                                            self.state.step, self.run_dir / "checkpoints", "SFT steps")
                self.state.wall_time_s = wall_before + time.time() - t_start
                if cfg.train.save_every and self.state.step % cfg.train.save_every == 0:
                    self.save()
                if stop.requested:
                    interrupted = True
                    break
        if interrupted:
            res["interrupted"] = True
            path = self.save()
            self._write_results()
            progress.write(f"[postrl] interrupted at step {self.state.step}; checkpoint {path}. "
                           f"Resume with: postrl sft {self.run_dir / 'config.yaml'} --resume {self.run_dir}")
            return res
        if cfg.eval.after:
            res["eval_after"] = self.evaluate()
            if cfg.run.progress:
                print(f"[eval] after SFT: held-out completion loss {res['eval_after']['loss']:.4f}", flush=True)
        self.state.wall_time_s = wall_before + time.time() - t_start
        res.update(steps=self.state.step, wall_time_s=self.state.wall_time_s,
                   nonfinite_steps=self.state.nonfinite_total)
        self.save()
        self._write_results()
        return res


def train_sft(cfg: Config, resume: str | Path | None = None,
              run_dir: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Run (or resume) SFT; returns the run directory and ``results``.

    ``run_dir`` (new runs only) names the directory to create instead of ``run.output_dir/run.name``; it must
    be absent or empty. The starting weights are ``model.name_or_path`` (e.g. a previous stage's checkpoint).
    """
    trainer = SFTTrainer(cfg, resume=resume, run_dir=run_dir)
    return trainer.run_dir, trainer.fit()
