"""Data-parallel training with ``torch.distributed``: one process per device, launched by ``torchrun``.

::

    torchrun --nproc-per-node 2 -m postrl train CONFIG train.strategy=ddp     # or fsdp (FSDP2)

Nothing here runs in a single process: with ``train.strategy: none`` (the default) and no ``torchrun``,
:func:`current` is None and every trainer takes its single-process code path unchanged.

What each rank does, and why an update equals one process on the whole batch
---------------------------------------------------------------------------

* **Data**: every rank draws the same prompts (same sampler, same seed, so the sampler state is the same on
  every rank and in every checkpoint) and keeps its share. RL keeps whole groups (the ``rollout.n``
  completions of one prompt stay on one rank, see :func:`rl_layout`); SFT, DPO and the reward model keep
  a share of each batch's rows.
* **Normalisers**: a loss that divides by a count over the batch (token-mean's number of tokens,
  sequence-mean's number of sequences, SFT's target tokens, DPO/RM's pairs) uses the count of the *global*
  mini batch: summed across ranks with :meth:`Dist.sum` where a rank only sees its rows. Each rank's loss is
  then its rows' share of the global loss, the global gradient is the *sum* of the ranks' gradients, and
  because DDP and FSDP average gradients over ranks, the loss is multiplied by the world size before
  backward (:meth:`Dist.backward`; :meth:`Dist.set_grad_sync` before each forward). Group statistics need no reduction (a group lives on one rank);
  estimators with batch statistics (``adv_std_scope: batch``, BNPO, whitening) see the whole batch
  (:meth:`Dist.global_advantages` gathers the rewards and masks, which are small).
* **Collectives in lock step**: FSDP all-gathers parameters in every forward and DDP synchronises
  gradients in the last backward of an update, so every rank runs the same number of micro batches per
  update: a rank with fewer rows runs zero-weight passes (:meth:`Dist.pad_chunks`). A non-finite loss on
  one rank does not stop its loop early; the ranks agree on whether to step (:meth:`Dist.all_true`).
* **Strategies**: ``ddp`` wraps the trained model in ``DistributedDataParallel`` (full replica per rank,
  gradients all-reduced); ``fsdp`` applies FSDP2 ``fully_shard`` to every transformer block and then the
  whole model (parameters, gradients and optimizer state sharded; ``train.mixed_precision: bf16`` computes
  in bfloat16 with float32 master weights and gradient reduction). The KL reference model and the PPO
  critic are sharded the same way (the reference holds no gradient, so under DDP it is a plain replica).
  In-process generation under FSDP runs on gathered (unsharded) weights (:class:`UnshardedBackend`),
  so ranks may decode different numbers of steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

log = logging.getLogger(__name__)

STRATEGIES = ("none", "ddp", "fsdp")
MIXED_PRECISION = ("none", "bf16")

_CURRENT: Optional["Dist"] = None


def current() -> Optional["Dist"]:
    """The process group of this run, or None in a single process (the default)."""
    return _CURRENT


def launched_world_size() -> int:
    """Processes started by ``torchrun`` (its ``WORLD_SIZE``), 1 without it."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def launched_rank() -> int:
    """This process's rank in a ``torchrun`` job (its ``RANK``), 0 without it."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s random streams (rank 0: the run seed itself)."""
    return seed if rank == 0 else (seed * 1_000_003 + 104_729 * rank) % (2**62)


# ------------------------------------------------------------------------------------------------------------
# The process group
# ------------------------------------------------------------------------------------------------------------


class Dist:
    """The process group one run trains in: rank, world size, the collectives the trainers use, and the
    strategy that wraps their models."""

    def __init__(self, strategy: str, mixed_precision: str = "none", owns_group: bool = False):
        import torch.distributed as dist

        if strategy not in ("ddp", "fsdp"):
            raise ValueError(f"Dist: strategy must be ddp or fsdp, got {strategy!r}")
        self.strategy, self.mixed_precision, self.owns_group = strategy, mixed_precision, owns_group
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.backend = dist.get_backend()
        # the device of collective tensors: NCCL needs them on this rank's GPU
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" \
            else torch.device("cpu")
        self.reduce_normalisers = True  # False: per-rank normalisers and averaged gradients (tests: it is wrong)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ----- collectives -----------------------------------------------------------------------------------
    def sums(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over ranks (one all-reduce, float64)."""
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return t.cpu().tolist()

    def sum(self, value: float) -> float:
        return self.sums([value])[0]

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` is true on every rank."""
        return self.sum(0.0 if flag else 1.0) == 0.0

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is true on some rank."""
        return self.sum(1.0 if flag else 0.0) > 0.0

    def max_int(self, value: int) -> int:
        import torch.distributed as dist

        t = torch.tensor([int(value)], dtype=torch.long, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def max(self, value: float) -> float:
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def gather_objects(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order, on every rank (pickled; for small things)."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def check_same(self, what: str, obj: Any) -> None:
        """Refuse to start when ``obj`` (e.g. the config) differs between ranks; the error names the ranks."""
        digest = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
        digests = self.gather_objects(digest)
        odd = [r for r, d in enumerate(digests) if d != digests[0]]
        if odd:
            from postrl.config import ConfigError

            raise ConfigError(f"the {what} of rank(s) {', '.join(map(str, odd))} differs from rank 0's; every "
                              f"rank of a torchrun job must get the same {what} (same file, same overrides)")

    # ----- data ------------------------------------------------------------------------------------------
    def share(self, items: Sequence[Any]) -> list[Any]:
        """This rank's contiguous share of ``items`` (sizes differ by at most one; the first ranks get more)."""
        n, w, r = len(items), self.world_size, self.rank
        start = r * (n // w) + min(r, n % w)
        return list(items[start:start + n // w + (1 if r < n % w else 0)])

    def pad_chunks(self, chunks: list[Any]) -> list[Any]:
        """This rank's micro batches of one update followed by ``None`` up to the largest count on any rank:
        every rank then runs the same number of forward/backward passes, which FSDP's all-gathers and DDP's
        gradient synchronisation need (the trainer runs a ``None`` as a zero-weight pass)."""
        return list(chunks) + [None] * (self.max_int(len(chunks)) - len(chunks))

    # ----- gradients -------------------------------------------------------------------------------------
    def set_grad_sync(self, train_model: Any, last: bool) -> None:
        """Call before the forward of each micro batch: gradients are synchronised only in the backward of the
        last one of an update (accumulated locally before it). DDP decides in its forward, FSDP in backward."""
        if self.strategy == "ddp":
            train_model.require_backward_grad_sync = last  # what DistributedDataParallel.no_sync() toggles
        else:
            train_model.set_requires_gradient_sync(last)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` of a micro batch whose loss is this rank's part of the global loss. DDP and FSDP
        average gradients over ranks; the loss is scaled by the world size so that the synchronised gradient is
        their sum, the gradient of the global loss."""
        (loss * float(self.world_size if self.reduce_normalisers else 1)).backward()

    # ----- models ----------------------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, trainable: bool = True) -> torch.nn.Module:
        """Wrap ``model`` for the strategy before its optimizer is built; returns the module that training
        forwards go through. ``ddp``: a ``DistributedDataParallel`` wrapper (``model`` itself stays the
        plain module for generation, evaluation and saving); a frozen model (the KL reference) is not
        wrapped. ``fsdp``: ``model`` is sharded in place (FSDP2) and returned."""
        if self.strategy == "fsdp":
            return self.shard(model)
        if not trainable:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.comm_device.index] if self.comm_device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """FSDP2: ``fully_shard`` every transformer block (the classes Hugging Face lists in
        ``_no_split_modules``), then the whole model (embeddings, tied LM head, the rest)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs: dict[str, Any] = {}
        if self.mixed_precision == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        blocks: set[str] = set()
        for m in model.modules():
            blocks.update(getattr(m, "_no_split_modules", None) or ())
        for m in list(model.modules()):
            if m is not model and type(m).__name__ in blocks:
                fully_shard(m, **kwargs)
        fully_shard(model, **kwargs)
        return model

    @contextlib.contextmanager
    def unsharded(self, model: torch.nn.Module) -> Iterator[None]:
        """FSDP: the full parameters gathered for the duration (every rank enters together, e.g. before
        generation, after which ranks may run different numbers of forwards); a no-op for DDP."""
        from torch.distributed.fsdp import FSDPModule

        if self.strategy != "fsdp" or not isinstance(model, FSDPModule):
            yield
            return
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        model.set_reshard_after_forward(False)
        for m in units:
            m.unshard()
        try:
            yield
        finally:
            for m in units:
                m.reshard()
            model.set_reshard_after_forward(True)  # FSDP2's defaults: reshard blocks, keep the root gathered
            model.set_reshard_after_forward(False, recurse=False)

    def full_state_dict(self, model: torch.nn.Module) -> Optional[dict[str, torch.Tensor]]:
        """The whole model's state dict on rank 0 (CPU), None elsewhere; every rank must call it (FSDP
        gathers the shards)."""
        if self.strategy != "fsdp":
            return model.state_dict() if self.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.is_main else None

    # ----- RL ----------------------------------------------------------------------------------------------
    def global_advantages(self, fn: Callable[..., torch.Tensor], layout: "RowLayout", rewards: torch.Tensor,
                          mask: torch.Tensor, group_size: int, cfg: Any, **inputs: Any) -> torch.Tensor:
        """``fn`` (an advantage estimator) over the whole rollout batch, this rank's rows of the result.

        The per-row inputs (rewards, masks, token rewards, values, baselines) of every rank are gathered in
        global row order, padded to the widest completion, so estimators with batch statistics compute them
        over the batch, exactly as one process would; every rank computes the same result (and the same
        estimator ``state``)."""
        width = mask.shape[1]
        rows = {"rewards": rewards, "mask": mask,
                **{k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}}
        parts = self.gather_objects({k: v.detach().cpu() for k, v in rows.items()})
        full = {k: layout.assemble([p[k] for p in parts]) for k in rows}
        extra = {k: (full[k] if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        adv = fn(full["rewards"], full["mask"], group_size, cfg, **extra)
        return adv[layout.global_rows][:, :width].to(mask.device)


@dataclass
class RowLayout:
    """Which rows of the global rollout batch each rank holds: ``rows_of[r]`` are rank r's global row indices
    in its local order; this rank is ``rank``."""

    rows_of: list[list[int]]
    rank: int

    @property
    def global_size(self) -> int:
        return sum(len(r) for r in self.rows_of)

    @property
    def global_rows(self) -> torch.Tensor:
        return torch.tensor(self.rows_of[self.rank], dtype=torch.long)

    def local(self, global_idx: torch.Tensor) -> torch.Tensor:
        """Local positions of the rows of ``global_idx`` that this rank holds, in the order given."""
        pos = torch.full((self.global_size,), -1, dtype=torch.long)
        pos[self.global_rows] = torch.arange(len(self.rows_of[self.rank]))
        p = pos[global_idx]
        return p[p >= 0]

    def assemble(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Every rank's local rows (``parts[r]``, ``[B_r]`` or ``[B_r, T_r]``) in global row order; ``[B, T]``
        parts are right-padded with 0 to the widest."""
        first = parts[0]
        if first.dim() == 1:
            out = torch.zeros(self.global_size, dtype=first.dtype)
        else:
            out = torch.zeros(self.global_size, max(p.shape[1] for p in parts), dtype=first.dtype)
        for rows, p in zip(self.rows_of, parts):
            idx = torch.tensor(rows, dtype=torch.long)
            if p.dim() == 1:
                out[idx] = p
            else:
                out[idx, :p.shape[1]] = p
        return out


def rl_layout(prompts: int, n: int, mini: int, world: int, rank: int) -> tuple[list[int], RowLayout]:
    """Which of a step's ``prompts`` (groups of ``n`` completions, global row ``g * n + j``) each rank samples:
    ``(this rank's prompt indices, the row layout)``.

    When a mini batch holds whole groups that split evenly over the ranks (``mini / n`` divisible by
    ``world``), rank r takes the r-th slice of every mini batch's groups, so each update of the first
    epoch has the same number of rows on every rank; otherwise rank r takes the r-th contiguous block of
    prompts. Either way the mini batches are the single process's, row for row."""
    per_mini = mini // n if mini % n == 0 else 0
    if per_mini and per_mini % world == 0:
        k = per_mini // world
        groups_of = [[m * per_mini + r * k + i for m in range(prompts // per_mini) for i in range(k)]
                     for r in range(world)]
    else:
        k = prompts // world
        groups_of = [list(range(r * k, (r + 1) * k)) for r in range(world)]
    rows_of = [[g * n + j for g in groups for j in range(n)] for groups in groups_of]
    return groups_of[rank], RowLayout(rows_of, rank)


class UnshardedBackend:
    """A generation backend whose ``generate`` runs with the FSDP model's full weights gathered
    (:meth:`Dist.unsharded`): ranks decode independently (different lengths, different numbers of steps)."""

    def __init__(self, backend: Any, model: torch.nn.Module, dist: Dist):
        self.inner, self.model, self.dist = backend, model, dist
        self.name = backend.name
        self.reports_entropy = backend.reports_entropy

    def generate(self, prompt_token_ids, params, seed=None, batch_size: int = 0):
        with self.dist.unsharded(self.model):
            return self.inner.generate(prompt_token_ids, params, seed=seed, batch_size=batch_size)

    def sync_weights(self, model) -> None:
        self.inner.sync_weights(model)

    def close(self) -> None:
        self.inner.close()


# ------------------------------------------------------------------------------------------------------------
# Start and stop
# ------------------------------------------------------------------------------------------------------------


def activate(strategy: str, mixed_precision: str = "none", owns_group: bool = False) -> Dist:
    """Make a :class:`Dist` over the already initialised default process group the current one."""
    global _CURRENT
    _CURRENT = Dist(strategy, mixed_precision, owns_group)
    return _CURRENT


def init_distributed(cfg: Any) -> Optional[Dist]:
    """Join the ``torchrun`` job this process belongs to (``WORLD_SIZE`` > 1, or a process group the caller
    initialised), or None in a single process. Backend: NCCL when the model goes to a GPU, else gloo.
    Refuses a multi-process job with ``train.strategy: none`` and configs that differ between ranks."""
    import torch.distributed as dist

    from postrl.config import ConfigError, to_dict

    initialised = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialised else launched_world_size()
    strategy = cfg.train.strategy
    if world <= 1:
        if strategy != "none":
            log.info("train.strategy=%s: a single process (no torchrun), trained without a process group",
                     strategy)
        return None
    if strategy == "none":
        raise ConfigError(f"train.strategy=none trains in one process, but this is one of {world} processes "
                          "(torchrun); set train.strategy=ddp (a full replica per rank) or train.strategy=fsdp "
                          "(sharded parameters, gradients and optimizer state)")
    owns = False
    if not initialised:
        gpu = torch.cuda.is_available() and not str(cfg.model.device).startswith("cpu")
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if gpu else "gloo")
        owns = True
    d = activate(strategy, cfg.train.mixed_precision, owns_group=owns)
    try:
        d.check_same("config", to_dict(cfg))
    except BaseException:
        shutdown()
        raise
    return d


def shutdown() -> None:
    """Forget the current process group (and destroy it when :func:`init_distributed` created it)."""
    global _CURRENT
    d, _CURRENT = _CURRENT, None
    if d is not None and d.owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
