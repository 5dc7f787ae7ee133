"""The section of ``postrl dpo`` and ``postrl rm``: the preference loss and its parameters, the pairs, the loop."""

from __future__ import annotations

from dataclasses import dataclass

from .checks import Problems, ConfigTree


PAIR_SELECTIONS = ("best_worst", "rso")
ONLINE_REFERENCES = ("round", "initial")
LABEL_SMOOTHING_LOSSES = ("cdpo", "robust_dpo")


@dataclass
class PreferenceConfig:
    """Preference data and loops of ``postrl dpo`` and ``postrl rm`` (see docs/preference.md).

    The loss keys (``loss`` and its parameters) are what the functions of
    :mod:`postrl.algorithms.preference` read: the trainer passes this section as their ``cfg``.

    Batches count *pairs* (or unpaired examples for KTO): ``batch_size`` pairs per optimizer update,
    ``micro_batch_size`` pairs per forward/backward (must divide ``batch_size``). Optimizer settings
    (lr, schedule, betas, grad_clip, save_every, keep_checkpoints) come from ``train``; ``train.steps`` is
    not used (updates = epochs x ceil(pairs / batch_size), per round when online).
    """

    loss: str = "dpo"
    """``postrl dpo``: registered preference loss (dpo | ipo | cdpo | robust_dpo | simpo | orpo | kto | slic)."""
    beta: float = 0.1
    """beta of DPO/IPO/cDPO/robust DPO/KTO (IPO's tau) and SimPO's reward scale."""
    label_smoothing: float = 0.0
    """cdpo / robust_dpo: assumed label-flip rate eps in [0, 0.5); must be 0 for the other losses."""
    simpo_gamma: float = 0.5
    """simpo: target reward margin gamma (SimPO eq. 6)."""
    orpo_lambda: float = 0.1
    """orpo: weight lambda of the odds-ratio term added to the chosen NLL (ORPO eq. 6)."""
    slic_delta: float = 1.0
    """slic: hinge margin delta on the sequence log-likelihood difference."""
    slic_lambda: float = 0.1
    """slic: weight of the NLL regularizer on the chosen completion."""
    kto_lambda_d: float = 1.0
    """kto: weight lambda_D of desirable examples (KTO eq. 8)."""
    kto_lambda_u: float = 1.0
    """kto: weight lambda_U of undesirable examples (KTO eq. 8)."""
    path: str | None = None
    """Pairs: a .jsonl or .parquet file, a ``datasets`` directory (save_to_disk) or data files, or a hub
    dataset name (online only); None = synthetic pairs from ``data`` (chosen = the reference answer,
    rejected = another example's different answer)."""
    eval_path: str | None = None
    """Held-out pairs (same formats); None = hold out ``eval_size`` pairs of ``path``."""
    split: str = "train"
    """Split of a ``datasets`` dataset to train on."""
    eval_split: str | None = None
    """Split of a ``datasets`` dataset for held-out pairs; None = hold out ``eval_size`` of ``split``."""
    train_size: int = 0
    """Training pairs to use; 0 = all."""
    eval_size: int = 64
    """Held-out pairs (when no eval_path / eval_split is given)."""
    max_length: int = 512
    """Maximum prompt + completion tokens; longer sequences are truncated (prompt from the left down to
    max_prompt_length first, then the completion from the right) and counted."""
    max_prompt_length: int = 256
    """Maximum prompt tokens kept (from the end) when a sequence exceeds max_length; < max_length."""
    batch_size: int = 8
    """Pairs per optimizer update."""
    micro_batch_size: int = 0
    """Pairs per forward/backward (gradients accumulate); must divide batch_size; 0 = batch_size."""
    epochs: int = 1
    """Passes over the pairs (per round when online)."""
    eval_batch_size: int = 16
    """Pairs per forward pass for reference log-probs and held-out evaluation (memory knob only)."""
    chat_template: bool = True
    """Render plain-string pairs through the tokenizer's chat template (as ``postrl train`` renders prompts);
    false = plain concatenation, as TRL does for non-conversational data. Conversational data always uses it."""
    use_margin: bool = True
    """``postrl rm``: subtract a per-pair ``margin`` field, when the data has one (Llama 2 style)."""
    online: bool = False
    """Online / iterative DPO: each round samples rollout.n completions for prompts of ``data``, ranks them
    with ``rewards`` and trains on best-vs-worst pairs."""
    rounds: int = 2
    """Online: number of rounds."""
    prompts_per_round: int = 16
    """Online: prompts sampled per round (each gets rollout.n completions)."""
    pair_selection: str = "best_worst"
    """Online: best_worst (highest vs lowest reward; ties skipped) | rso (statistical rejection sampling,
    Liu et al. 2023, then best vs worst of the accepted)."""
    rso_beta: float = 0.5
    """Online, rso: temperature beta of the target pi_r ~ pi exp(r / beta)."""
    online_reference: str = "round"
    """Online: reference = the policy at the start of each round (round, iterative DPO) or the initial model
    (initial)."""

    def validate(self, p: Problems, cfg: ConfigTree) -> None:
        # imported here: postrl.algorithms imports torch, which loading a config does not otherwise need
        from postrl.algorithms.preference import PREFERENCE_LOSSES

        p.registered(PREFERENCE_LOSSES, self.loss)
        p.check(self.beta > 0, "preference.beta", self.beta, "must be > 0")
        p.check(0 <= self.label_smoothing < 0.5, "preference.label_smoothing", self.label_smoothing,
                "must be in [0, 0.5)")
        p.check(self.label_smoothing == 0 or self.loss in LABEL_SMOOTHING_LOSSES, "preference.label_smoothing",
                self.label_smoothing, f"is used only by preference.loss cdpo or robust_dpo (not {self.loss!r}); set 0")
        for key in ("orpo_lambda", "slic_delta", "slic_lambda", "kto_lambda_d", "kto_lambda_u"):
            p.at_least(f"preference.{key}", getattr(self, key), 0)
        for key in ("train_size", "eval_size"):
            p.at_least(f"preference.{key}", getattr(self, key), 0)
        for key in ("max_length", "max_prompt_length", "batch_size", "epochs", "eval_batch_size", "rounds",
                    "prompts_per_round"):
            p.at_least(f"preference.{key}", getattr(self, key), 1)
        p.check(self.max_prompt_length < self.max_length, "preference.max_prompt_length", self.max_prompt_length,
                f"must be smaller than preference.max_length ({self.max_length}) to leave room for the completion")
        p.micro_batch_divides("preference", self.batch_size, self.micro_batch_size, "pairs")
        p.choice("preference.pair_selection", self.pair_selection, PAIR_SELECTIONS)
        p.choice("preference.online_reference", self.online_reference, ONLINE_REFERENCES)
        p.check(self.rso_beta > 0, "preference.rso_beta", self.rso_beta, "must be > 0")
