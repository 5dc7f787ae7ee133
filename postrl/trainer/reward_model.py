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

import math
import time
from pathlib import Path
from typing import Any

import torch

from postrl.algorithms.preference import bradley_terry_loss
from postrl.config import Config, ConfigError, check_command
from postrl.data import build_data_source
from postrl.data.pairs import TokenizedPair, load_preference_data
from postrl.models.loading import ModelLoadError, resolve_device, resolve_dtype
from postrl.models.lora import add_lora, lora_enabled
from postrl.run import Job, StepOutput, distributed, run_job
from postrl.run.batching import epoch_batches, right_pad
from postrl.run.optim import accumulated_update, build_optimizer
from postrl.run.progress import PAIR_FIELDS


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


class RewardModelTrainer(Job):
    """The reward-model step (Bradley-Terry over pairs) as a :class:`postrl.run.Job`."""

    command = "rm"
    progress_fields = PAIR_FIELDS

    def __init__(self, cfg: Config, checkpoint: Path | None = None):
        self.cfg = cfg
        pf, m = cfg.preference, cfg.model
        check_command(cfg, "rm")
        lora = lora_enabled(m)  # LoRA: the base model of model.name_or_path, the adapter (and score head) trained
        self.model, self.tokenizer = load_reward_model(str(checkpoint) if checkpoint and not lora else m.name_or_path,
                                                       m.dtype, m.device, m.trust_remote_code)
        if lora:
            self.model = add_lora(self.model, m.lora, checkpoint, task_type="SEQ_CLS", base_name_or_path=m.name_or_path)
        self.model_source = str(checkpoint) if checkpoint else m.name_or_path
        self.pad = self.tokenizer.pad_token_id
        source = build_data_source(cfg) if pf.path is None else None
        self.data = load_preference_data(cfg, self.tokenizer, source)
        if not isinstance(self.data.train[0], TokenizedPair):
            raise ConfigError("postrl rm needs chosen/rejected pairs; the data is unpaired (prompt/completion/label)")
        self.dist = distributed.current()  # None: one process; else each rank scores its share of a batch
        self.train_model = self.model if self.dist is None else self.dist.prepare(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.per_epoch = math.ceil(len(self.data.train) / pf.batch_size)
        self.total_steps = pf.epochs * self.per_epoch
        self.optimizer, self.scheduler = build_optimizer(self.params, cfg.train, self.total_steps)

    def scores(self, idx: list[int], items: list[TokenizedPair], model: Any = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(r_chosen, r_rejected, margin)`` of the pairs ``idx``, each ``[b]``."""
        chunk = [items[i] for i in idx]
        seqs = [x.prompt_ids + x.chosen_ids for x in chunk] + [x.prompt_ids + x.rejected_ids for x in chunk]
        ids, mask = right_pad(seqs, self.pad, next(self.model.parameters()).device)
        r = (model or self.model)(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, 0].float()
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

    def describe_eval(self, ev: dict[str, Any]) -> str | None:
        return f"held-out pairwise accuracy {ev['accuracy']:.1%} (n={ev['n']})" if ev.get("n") else None

    def results_header(self) -> dict[str, Any]:
        return {"data": {"train": len(self.data.train), "eval": len(self.data.eval), **self.data.counts}}

    def step(self, run) -> StepOutput:
        """One update over a batch of pairs: mean Bradley-Terry loss, micro batches accumulated."""
        cfg, pf = self.cfg, self.cfg.preference
        micro = pf.micro_batch_size or pf.batch_size
        epoch, b = divmod(run.state.step, self.per_epoch)
        batch = epoch_batches(len(self.data.train), pf.batch_size, cfg.run.seed, epoch)[b]
        t0 = time.time()
        self.model.train()

        def loss_of(chunk: list[int]):
            rc, rr, mg = self.scores(chunk, self.data.train, self.train_model)
            losses, st = bradley_terry_loss(rc, rr, mg if pf.use_margin else None)
            return losses.sum() / len(batch), {"accuracy": float(st["accuracy"].sum()) / len(batch),
                                               "margins": float(st["margins"].sum()) / len(batch)}

        sums, lr, gnorm, ok = accumulated_update(batch, micro, loss_of, self.params, self.optimizer, self.scheduler,
                                                 cfg.train.grad_clip, self.dist, self.train_model)
        dt = time.time() - t0
        return StepOutput({"epoch": epoch + 1, **sums, "grad_norm": float(gnorm), "lr": lr,
                           "skipped_update": 0 if ok else 1, "step_time_s": dt, "pairs_per_s": len(batch) / dt}, ok=ok,
                          updated=gnorm > 0)


def train_rm(cfg: Config, resume: str | Path | None = None,
             run_dir: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Train (or resume) a reward model; returns ``(run_dir, results)`` (see :func:`postrl.run.run_job`).

    ``results`` holds ``eval_before`` / ``eval_after`` (held-out pairwise accuracy, mean margin ``r_c - r_r``,
    loss), ``data`` counts, ``steps``, ``wall_time_s`` and ``final_model`` (``RUN_DIR/final``, loadable with
    ``AutoModelForSequenceClassification.from_pretrained``).
    """
    return run_job(RewardModelTrainer, cfg, resume=resume, run_dir=run_dir)
