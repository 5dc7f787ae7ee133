"""One library per process: the postrl and TRL workers of ``bench_grpo.py``.

A worker loads its trainer, reports ``{"ready": ...}`` and then runs exactly one
training step (rollout + one optimizer update) each time the coordinator writes
``step`` on its stdin, answering with one JSON line of measurements. ``quit`` ends
it with a final line holding its peak resident memory. Running each library in
its own process gives each a clean ``ru_maxrss``; the coordinator only ever lets
one worker compute at a time, so the two never compete for the cores.

Protocol lines go to a private copy of the original stdout; everything the
libraries print is redirected to stderr (the coordinator's log file).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from typing import Any

import torch


class Quit(Exception):
    """The coordinator said ``quit``."""


class Channel:
    """Line protocol over stdin and a private duplicate of stdout."""

    def __init__(self):
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)  # library prints (TRL, transformers) go to stderr
        sys.stdout = sys.stderr

    def send(self, **msg: Any) -> None:
        self.out.write(json.dumps(msg) + "\n")
        self.out.flush()

    def wait_for_step(self) -> None:
        line = sys.stdin.readline()
        if not line or line.strip() == "quit":
            raise Quit
        if line.strip() != "step":
            raise RuntimeError(f"worker: unknown command {line!r} (expected 'step' or 'quit')")


def peak_rss_mb() -> float:
    """Peak resident set size of this process (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def gpu_peak_mb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_config(spec: dict[str, Any]):
    """The postrl :class:`~postrl.config.Config` of a benchmark spec (also used by the TRL worker for data)."""
    from postrl.config import Config, from_dict, validate

    raw = {
        "model": {"name_or_path": spec["model_path"], "dtype": spec["dtype"], "device": spec["device"]},
        "data": {"source": "reasoning_gym", "task": spec["task"], "task_kwargs": spec["task_kwargs"],
                 "train_size": spec["train_size"], "eval_size": 10, "system_prompt": spec["system_prompt"],
                 "answer_extraction": spec["answer_extraction"]},
        "rollout": {"n": spec["n"], "max_new_tokens": spec["max_new_tokens"], "temperature": spec["temperature"],
                    "min_new_tokens": spec.get("min_new_tokens", 0)},
        "scoring": {"workers": 0},  # rewards in-process, as TRL computes them
        "algo": {"advantage": "grpo", "policy_loss": "ppo_clip", "loss_agg": spec["postrl_loss_agg"],
                 "clip_eps_low": 0.2, "clip_eps_high": 0.2, "kl_coef": 0.0},
        "train": {"steps": spec["total_steps"], "prompts_per_step": spec["prompts_per_step"],
                  "mini_batch_size": 0, "micro_batch_size": spec["micro_batch_size"], "epochs": 1,
                  "lr": spec["lr"], "grad_clip": 1.0, "lr_schedule": "constant", "weight_decay": 0.0},
        "eval": {"before": False, "after": False},
        "run": {"name": "bench", "output_dir": spec["output_dir"], "seed": spec["seed"], "progress": False,
                "threads": spec["threads"]},
    }
    for key, value in spec.get("postrl_overrides", {}).items():  # e.g. {"rollout.static_cache": false}
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = value
    cfg = from_dict(Config, raw)
    validate(cfg)
    return cfg


def step_samples(spec: dict[str, Any]):
    """The prompts of every step, in postrl's sampler order (TRL is fed the same order, unshuffled)."""
    from postrl.data import PromptSampler
    from postrl.data import build_data_source

    cfg = bench_config(spec)
    source = build_data_source(cfg)
    sampler = PromptSampler(source.train, seed=cfg.resolved_data_seed)
    return cfg, source, [sampler.next_batch(spec["prompts_per_step"]) for _ in range(spec["total_steps"])]


# ----------------------------------------------------------------------------------------------------------------
# postrl
# ----------------------------------------------------------------------------------------------------------------


def run_postrl(spec: dict[str, Any], chan: Channel, baseline: bool = False) -> None:
    from postrl.run.memory import keep_freed_memory
    from postrl.run.rng import seed_everything
    from postrl.trainer.rl import RLTrainer

    torch.set_num_threads(spec["threads"])
    if not baseline:  # what postrl.run.run_job does for `postrl train` (the levers-off run keeps glibc's defaults)
        keep_freed_memory()
    t0 = time.perf_counter()
    cfg = bench_config(spec)
    seed_everything(cfg.run.seed)  # what postrl.run.run_job does before building the trainer
    trainer = RLTrainer(cfg)
    generator = trainer.backend.generator  # the torch backend's Generator
    if baseline:  # the speed levers off: DynamicCache, torch.multinomial, no shared prefill (generation nor
        # update), unsorted micro batches, transformers' decode forward
        generator.kv_cache, generator.sampler = "dynamic", "multinomial"
        generator.share_prefill = False
        generator.decode = "transformers"
        trainer.sort_micro_batches = False
        trainer.share_prefix = False
    timing = {"gen_s": 0.0}
    generate = generator.generate

    def timed_generate(*args, **kwargs):
        _sync()
        start = time.perf_counter()
        out = generate(*args, **kwargs)
        _sync()
        timing["gen_s"] += time.perf_counter() - start
        return out

    generator.generate = timed_generate
    chan.send(ready=True, load_s=time.perf_counter() - t0, rss_mb=peak_rss_mb())
    step = 0
    try:
        while True:
            chan.wait_for_step()
            timing["gen_s"] = 0.0
            _sync()
            start = time.perf_counter()
            batch = trainer.rollout(step)
            upd = trainer.update(batch, step)
            _sync()
            step_s = time.perf_counter() - start
            gen_tokens = int(batch.attention_mask.sum())
            prompt_tokens = sum(len(p) for p in batch.prompt_ids)
            chan.send(step=step, step_s=step_s, gen_s=timing["gen_s"], gen_tokens=gen_tokens,
                      prompt_tokens=prompt_tokens, reward_mean=float(batch.rewards.mean()),
                      rows_computed_frac=upd["rows_computed_frac"], loss=upd["loss"], grad_norm=upd["grad_norm"],
                      rss_mb=peak_rss_mb(), gpu_peak_mb=gpu_peak_mb())
            step += 1
    except Quit:
        pass
    finally:
        trainer.close()
    chan.send(done=True, rss_mb=peak_rss_mb(), gpu_peak_mb=gpu_peak_mb())


# ----------------------------------------------------------------------------------------------------------------
# TRL
# ----------------------------------------------------------------------------------------------------------------

# postrl aggregation name -> TRL loss_type with the same normalisation when one optimizer step covers the whole
# rollout batch: token_mean = sum of token losses / number of completion tokens of the batch ("dapo": TRL divides by
# num_items_in_batch, the active tokens of the generation batch); seq_mean_token_mean = mean over sequences of each
# sequence's token mean ("grpo": TRL takes the per-sequence mean, averages a micro batch and divides by the number of
# accumulation steps, which equals the batch mean because every micro batch has the same number of sequences).
TRL_LOSS_TYPE = {"token_mean": "dapo", "seq_mean_token_mean": "grpo"}


def run_trl(spec: dict[str, Any], chan: Channel) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from postrl.data import build_messages, render_prompt

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    cfg, source, per_step = step_samples(spec)
    samples = [s for batch in per_step for s in batch]
    messages = [build_messages(s, cfg.data.system_prompt, cfg.data.prompt_template) for s in samples]
    dataset = Dataset.from_list([{"prompt": m, "idx": i} for i, m in enumerate(messages)])

    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=dtype)
    prompt_tokens = [len(render_prompt(tokenizer, m)) for m in messages]
    n, B = spec["n"], spec["prompts_per_step"] * spec["n"]
    micro = spec["micro_batch_size"]
    accumulation = B // micro
    stats: dict[str, Any] = {}

    def task_reward(completions, idx, completion_ids, **kwargs):
        """The same scorer postrl's ``task`` reward uses (the source's own, strict=False gives 0 on failure)."""
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scores = [source.score(t, samples[i]) for t, i in zip(texts, idx)]
        stats["gen_tokens"] = stats.get("gen_tokens", 0) + sum(len(c) for c in completion_ids)
        stats["prompt_tokens"] = stats.get("prompt_tokens", 0) + sum(prompt_tokens[i] for i in idx)
        stats.setdefault("rewards", []).extend(scores)
        return scores

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-", dir=spec["output_dir"]),
        per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation,  # one generation batch of B completions per optimizer step
        num_generations=n, max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"], top_p=1.0, top_k=0,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0,
        beta=0.0, num_iterations=1, epsilon=0.2, loss_type=TRL_LOSS_TYPE[spec["postrl_loss_agg"]],
        scale_rewards="group", use_vllm=False, bf16=False, fp16=False, gradient_checkpointing=False,
        max_steps=spec["total_steps"], logging_steps=1, save_strategy="no", report_to="none",
        seed=spec["seed"], shuffle_dataset=False, use_cpu=spec["device"] == "cpu", dataloader_num_workers=0,
        log_completions=False, disable_tqdm=True,
        generation_kwargs={"min_new_tokens": spec["min_new_tokens"]} if spec.get("min_new_tokens") else None,
    )

    class LockStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            chan.wait_for_step()
            stats.clear()
            stats["gen_s"] = 0.0
            _sync()
            stats["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            step_s = time.perf_counter() - stats["start"]
            rewards = stats.get("rewards", [])
            chan.send(step=state.global_step - 1, step_s=step_s, gen_s=stats["gen_s"],
                      gen_tokens=int(stats.get("gen_tokens", 0)), prompt_tokens=int(stats.get("prompt_tokens", 0)),
                      reward_mean=float(sum(rewards) / max(1, len(rewards))), rows_computed_frac=1.0,
                      rss_mb=peak_rss_mb(), gpu_peak_mb=gpu_peak_mb())

    trainer = GRPOTrainer(model=model, reward_funcs=task_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[LockStep()])
    generate = trainer._generate

    def timed_generate(*a, **k):
        _sync()
        start = time.perf_counter()
        out = generate(*a, **k)
        _sync()
        stats["gen_s"] += time.perf_counter() - start
        return out

    trainer._generate = timed_generate
    chan.send(ready=True, load_s=time.perf_counter() - t0, rss_mb=peak_rss_mb())
    try:
        trainer.train()
        chan.wait_for_step()  # the coordinator asks for no more steps than max_steps; this reads its quit
    except Quit:
        pass
    chan.send(done=True, rss_mb=peak_rss_mb(), gpu_peak_mb=gpu_peak_mb())


def main() -> int:
    lib, spec = sys.argv[1], json.loads(sys.argv[2])
    chan = Channel()
    if lib == "postrl_base":
        run_postrl(spec, chan, baseline=True)
    else:
        {"postrl": run_postrl, "trl": run_trl}[lib](spec, chan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
