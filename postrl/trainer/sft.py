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

import logging
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch

from postrl.config import Config
from postrl.data import build_data_source
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
from postrl.models.loading import load_policy
from postrl.models.logprobs import token_logprobs
from postrl.run import Job, StepOutput, TrainingError, distributed, run_job
from postrl.run.optim import accumulated_update, build_optimizer
from postrl.run.rng import step_seed

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


class SFTTrainer(Job):
    """The SFT step as a :class:`postrl.run.Job`; ``postrl.run`` owns the run around it."""

    command = "sft"
    progress_fields = (("loss", "loss", "{:.4f}"), ("lr", "lr", "{:.2e}"), ("tok/s", "tokens_per_s", "{:.0f}"))

    def __init__(self, cfg: Config, checkpoint: Path | None = None):
        self.cfg = cfg
        self.model, self.tokenizer, self.model_source = load_policy(cfg.model, checkpoint)  # + LoRA adapters
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.stats = {"train": SFTStats(), "eval": SFTStats()}
        self.train_examples, self.eval_examples = self._load_data()
        s = cfg.sft
        self.rows: list[list[SFTExample]] = (pack(self.train_examples, s.max_length) if s.packing
                                             else [[e] for e in self.train_examples])
        self.steps_per_epoch = math.ceil(len(self.rows) / s.batch_size)
        self.total_steps = s.epochs * self.steps_per_epoch
        if s.max_steps:
            self.total_steps = min(self.total_steps, s.max_steps)
        self.dist = distributed.current()  # None: one process; else each rank trains on its share of a batch
        self.train_model = self.model if self.dist is None else self.dist.prepare(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = build_optimizer(self.params, cfg.train, self.total_steps)

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

    def _forward(self, batch: dict[str, torch.Tensor], model: Any = None) -> torch.Tensor:
        kwargs: dict[str, Any] = {"attention_mask": batch["attention_mask"]}
        if "position_ids" in batch:
            kwargs["position_ids"] = batch["position_ids"]
        return (model or self.model)(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits

    # ----- one step ------------------------------------------------------------------------------------------
    def update(self, rows: list[list[SFTExample]]) -> dict[str, float]:
        micro = self.cfg.sft.micro_batch_size or self.cfg.sft.batch_size
        n_tokens = float(sum(sum(e.loss_mask) for r in rows for e in r))
        self.model.train()

        def loss_of(chunk: list[list[SFTExample]]):
            batch = self._tensors(chunk)
            return sft_loss(self._forward(batch, self.train_model), batch["input_ids"], batch["loss_mask"],
                            n_tokens), {}

        sums, lr, gnorm, ok = accumulated_update(rows, micro, loss_of, self.params, self.optimizer, self.scheduler,
                                                 self.cfg.train.grad_clip, self.dist, self.train_model)
        total = sums["loss"]
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

    def describe_eval(self, ev: dict[str, Any]) -> str:
        return f"held-out completion loss {ev['loss']:.4f} (n={ev['n']})"

    def eval_metrics(self, ev: dict[str, Any]) -> dict[str, float]:
        return {"eval/loss": ev["loss"]}

    def results_header(self) -> dict[str, Any]:
        data = {k: v.as_dict() for k, v in self.stats.items()}
        return {"data": {**data, "train_rows": len(self.rows)}, "total_steps": self.total_steps}

    # ----- the step ------------------------------------------------------------------------------------------
    def step(self, run) -> StepOutput:
        step = run.state.step
        t0 = time.time()
        upd = self.update(self.batch_rows(step))
        dt = time.time() - t0
        return StepOutput({"epoch": step // self.steps_per_epoch, "loss": upd["loss"], "grad_norm": upd["grad_norm"],
                           "lr": upd["lr"], "target_tokens": upd["target_tokens"], "tokens": upd["tokens"],
                           "tokens_per_s": upd["tokens"] / max(dt, 1e-9), "step_time_s": dt}, ok=upd["ok"],
                          updated=upd["grad_norm"] > 0)


def train_sft(cfg: Config, resume: str | Path | None = None,
              run_dir: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Run (or resume) SFT; returns the run directory and ``results``.

    ``run_dir`` (new runs only) names the directory to create instead of ``run.output_dir/run.name``; it must
    be absent or empty. The starting weights are ``model.name_or_path`` (e.g. a previous stage's checkpoint).
    """
    return run_job(SFTTrainer, cfg, resume=resume, run_dir=run_dir)
