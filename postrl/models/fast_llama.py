"""A decode forward of our own for Llama-family causal LMs (Llama, SmolLM2, Qwen2, Qwen3, Mistral without
sliding window), built from the Hugging Face model's own weight tensors.

Why: transformers' forward is general (any cache, any mask, any attention kernel), and at decode time
(one token per row) its framework work — mask building, cache bookkeeping, separate q / k / v and gate /
up projections — costs as much as the matrix products. This forward does only the arithmetic:

- q|k|v and gate|up are each one matrix product, over concatenated copies of the weights that
  :meth:`FusedLlama.refresh` re-copies at each ``generate`` (the trainer updates the weights in place
  between generations; ~10 ms for SmolLM2-135M);
- rotary embeddings come from a cos/sin table computed once by the model's own rotary module;
- the KV cache is preallocated ``[layers, B, kv_heads, capacity, head_dim]`` with one write column per row
  (``end``) and an additive mask of the valid columns per row, updated in place (one column per step),
  never rebuilt: left padding and rows that joined the batch later (continuous batching) are the same
  case;
- decode attention lays out the ``g = heads / kv_heads`` query heads of a KV head as ``g`` query
  positions (grouped-query attention without repeating K/V): two matrix products and a softmax on CPU
  (faster there than ``scaled_dot_product_attention``, which runs elsewhere and for the prefill);
- shared prompts (a GRPO group repeats each prompt n times): :meth:`FusedLlama.prefill` with
  ``shared=True`` keeps each distinct prompt's keys / values once (``KVCache.pk / pv``) and the rows only
  their generated tokens; decode attention then reads a prompt's keys once for all its rows, as one
  matrix product over the rows' queries (cascade attention: the prompt part and the generated part are
  attended apart and joined as a split softmax). For 234-token prompts x 8 copies this reads
  1/8 of the prompt keys and values per step;
- the norms, the SiLU MLP and the (tied or untied) LM head compute what transformers computes;
- on CPU in float32 every matrix product of the decode path (q|k|v, o, gate|up, down, LM head) runs
  through oneDNN with the weight reordered once per ``generate`` into oneDNN's blocked layout
  (:func:`prepack_available`). ``F.linear`` re-packs the weight at every call, which at decode shapes
  ([64 x 576] times a [576 x 3072] weight) costs as much as the product: measured 1.3-2.5x faster per
  product on the 2-core machine, the LM head 85 -> 188 GFLOP/s at 64 rows (BENCHMARKS.md, issue 19). The
  packed copies are freed after the generation (:meth:`FusedLlama.release`).

The values equal transformers' forward to float rounding (tests/test_fast_decode.py: logits to 1e-5 in
fp32, the same greedy tokens). :func:`supports` says which models qualify. A PEFT model with plain LoRA
adapters on its projections qualifies: :meth:`FusedLlama.refresh` merges ``W + (alpha / r) B A`` into the
copies it makes anyway, so a LoRA policy decodes as fast as a fully fine-tuned one. Anything else (other
architectures, DoRA or other adapter types, quantized layers, dynamic rotary scaling, sliding-window
attention) runs through the transformers forward instead.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from postrl.models.lora import is_lora_model

FAMILIES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # the table does not depend on the sequence length


def base_model(model):
    """The transformers model inside a PEFT wrapper (``PeftModel.get_base_model()``), else ``model`` itself."""
    return model.get_base_model() if is_lora_model(model) else model


def _projection_reason(m) -> str | None:
    """None when projection ``m`` is a plain ``nn.Linear`` or a PEFT LoRA ``Linear`` over one (whose adapters
    :func:`_effective` merges), else why :class:`FusedLlama` cannot run it."""
    if type(m) is nn.Linear:
        return None
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        LoraLinear = None
    if LoraLinear is None or type(m) is not LoraLinear:
        return "a projection is not a plain nn.Linear or a PEFT LoRA Linear (quantized or other adapter layers)"
    if type(m.get_base_layer()) is not nn.Linear:
        return "a LoRA layer over a base layer that is not a plain nn.Linear (quantized)"
    for name in m.active_adapters:
        if name in m.lora_A and (m.use_dora.get(name) or getattr(m, "lora_bias", {}).get(name)
                                 or getattr(m, "lora_variant", {}).get(name) is not None):
            return f"LoRA adapter {name!r} is DoRA / has a bias / is another LoRA variant (only plain LoRA)"
    return None


def _effective(m) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias that projection ``m`` applies: a plain ``nn.Linear``'s own tensors, or for a PEFT
    LoRA layer its base weight plus ``scaling * B A`` of each active, unmerged adapter (Hu et al. 2021: the
    layer computes ``W x + (alpha / r) B A x``; a new tensor; dropout is off at generation)."""
    if type(m) is nn.Linear:
        return m.weight, m.bias
    base = m.get_base_layer()
    if m.disable_adapters:
        return base.weight, base.bias
    deltas = [m.get_delta_weight(a) for a in m.active_adapters if a in m.lora_A and a not in m.merged_adapters]
    if not deltas:
        return base.weight, base.bias
    return base.weight.detach() + sum(deltas).to(base.weight.dtype), base.bias


def unsupported_reason(model) -> str | None:
    """Why :class:`FusedLlama` cannot run ``model`` (a transformers model, or a PEFT model with plain LoRA
    adapters on its projections), or None when it can."""
    model = base_model(model)
    name = type(model).__name__
    if name not in FAMILIES:
        return f"{name} is not one of {', '.join(FAMILIES)}"
    cfg = model.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act={cfg.hidden_act!r} (only silu)"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in _STATIC_ROPE:
        return f"rope_type={rope_type!r} (supported: {', '.join(_STATIC_ROPE)})"
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        if any(t != "full_attention" for t in layer_types):
            return "sliding-window attention layers"
    elif getattr(cfg, "sliding_window", None) is not None:
        return f"sliding_window={cfg.sliding_window}"
    if getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:
        return f"partial_rotary_factor={cfg.partial_rotary_factor}"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb") or not isinstance(
            getattr(inner, "embed_tokens", None), nn.Embedding):
        return "no model.layers / model.embed_tokens / model.rotary_emb"
    if any(type(p) not in (nn.Parameter, torch.Tensor) for p in model.parameters()):
        return "parameters that are not plain tensors (sharded DTensors, quantized weights)"
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        return f"LM head is {type(head).__name__}, not nn.Linear"
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        reason = next((r for r in map(_projection_reason, linears) if r), None)
        if reason:
            return reason
        if not all(m.weight.dtype.is_floating_point for m in linears):
            return "non-floating-point weights"
    return None


def supports(model) -> str | None:
    """The family name (``llama``, ``mistral``, ``qwen2``, ``qwen3``) when :class:`FusedLlama` can run
    ``model``, else None."""
    return None if unsupported_reason(model) else FAMILIES[type(base_model(model)).__name__]


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalise in float32, scale in the input dtype (float32: torch's fused
    ``rms_norm``, the same arithmetic in one kernel instead of five)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding ``x cos + rotate_half(x) sin`` (transformers' ``apply_rotary_pos_emb``), with the sign of
    ``rotate_half`` folded into the table: ``rotate_half(x) sin = [x2, x1] * [-sin1, sin2]`` (``sin_signed``,
    :meth:`FusedLlama._rotary`), the same products without a negation pass."""
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], x[..., :half]), dim=-1).mul_(sin_signed).add_(x * cos)


# below this hidden size the packed product is not faster (2-core CPU, 2 threads, [rows x h] x [h x 3h]: at h = 128
# 58 vs 65 us for 64 rows, at h = 256 221 vs 183 us, at h = 512 1007 vs 553 us), so tiny models keep F.linear
PREPACK_MIN_HIDDEN = 256
_PACK_ROWS_HINT = 64  # the decode batch the blocking is chosen for (any number of rows is computed)


@functools.cache
def prepack_available() -> bool:
    """Whether this torch build has oneDNN's prepacked linear (``torch.ops.mkldnn._reorder_linear_weight`` and
    ``_linear_pointwise``, the kernels Inductor uses for CPU linear layers) and it computes ``F.linear``:
    checked once per process on a small product."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            x, w, b = torch.randn(3, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(5, generator=g)
            y = torch.ops.mkldnn._linear_pointwise(x, _pack(w), b, "none", [], "")
            return bool(torch.allclose(y, F.linear(x, w, b), atol=1e-5))
    except (AttributeError, RuntimeError):
        return False


def _pack(w: torch.Tensor) -> torch.Tensor:
    """``w [out, in]`` reordered into oneDNN's blocked layout."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), _PACK_ROWS_HINT)


def _linear(x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None,
            packed: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, w, b)``, through the prepacked copy of ``w`` when there is one (then ``w`` may be None)."""
    if packed is None:
        return F.linear(x, w, b)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, b, "none", [], "")


def _cat_into(store: dict, key: str, parts: list[torch.Tensor] | None) -> None:
    """``store[key] = cat(parts)``, written into the existing buffer when it has the right shape."""
    if parts is None:
        store[key] = None
        return
    shape = (sum(p.shape[0] for p in parts),) + tuple(parts[0].shape[1:])
    buf = store.get(key)
    if buf is None or buf.shape != shape or buf.dtype != parts[0].dtype or buf.device != parts[0].device:
        store[key] = torch.cat([p.detach() for p in parts])
    else:
        torch.cat([p.detach() for p in parts], out=buf)


class KVCache:
    """Keys and values of B rows, ``[layers, B, kv_heads, capacity, head_dim]`` each, zero-filled.

    Row ``b`` holds valid entries where ``bias[b]`` is 0 (``-inf`` elsewhere: the additive attention mask),
    writes its next token at column ``end[b]`` and gives it the rotary position ``pos[b]``. Columns below
    ``span`` (the largest ``end``) are finite in every row (zeros or stale values), so a masked column
    contributes exactly 0 to attention.

    Shared prompts (:meth:`set_prefixes`): ``pk / pv [layers, n, kv_heads, P, head_dim]`` hold n distinct
    prompts once (left-padded, ``pbias [n, P]`` their additive mask), ``pref [B]`` the prompt of each row;
    the row columns then hold only the generated tokens (their positions continue after the prompt's).
    """

    def __init__(self, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype, device):
        shape = (layers, batch, kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.bias = torch.full((batch, capacity), float("-inf"), dtype=dtype, device=device)
        self.end = torch.zeros(batch, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.span = 0
        self.capacity = capacity
        self.pk = self.pv = self.pbias = self.pref = None
        self._layout = None  # (pref, n, m, slot_pos) of the shared prompts, rebuilt when pref changes

    def set_prefixes(self, n: int, width: int) -> None:
        """Room for ``n`` shared prompts of ``width`` (left-padded) columns; every row's ``pref`` must be set
        by the caller (:meth:`FusedLlama.prefill` with ``shared=True``)."""
        layers, B, kv, _, d = self.k.shape
        self.pk = self.k.new_zeros((layers, n, kv, width, d))
        self.pv = self.v.new_zeros((layers, n, kv, width, d))
        self.pbias = self.bias.new_full((n, width), float("-inf"))
        self.pref = torch.zeros(B, dtype=torch.long, device=self.k.device)
        self._layout = None

    def prefix_layout(self) -> tuple[int, int, torch.Tensor]:
        """How rows map onto the blocks of the shared-prompt attention: ``(n, m, slot_pos)``, n prompts of at
        most m rows each, row b at ``slot_pos[b] = pref[b] * m + (its rank among the rows of its prompt)``;
        ``slot_pos`` is None when that is the identity (m rows per prompt, in prompt order: GRPO's layout
        before any row leaves), so that the rows are the blocks without a copy."""
        if self._layout is None or self._layout[0] is not self.pref:
            n = self.pk.shape[1]
            counts = torch.bincount(self.pref, minlength=n)
            m = int(counts.max())
            order = torch.argsort(self.pref, stable=True)
            starts = counts.cumsum(0) - counts
            rank = torch.empty_like(self.pref)
            rank[order] = torch.arange(len(order), device=order.device) - starts[self.pref[order]]
            slot_pos = self.pref * m + rank
            if n * m == len(slot_pos) and bool((slot_pos == torch.arange(n * m, device=slot_pos.device)).all()):
                slot_pos = None
            self._layout = (self.pref, n, m, slot_pos)
        return self._layout[1:]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def grow(self, span: int) -> None:
        """Make columns ``[0, span)`` readable: zero those not yet written in any row (finite values)."""
        if span > self.capacity:
            raise ValueError(f"KVCache: {span} tokens do not fit the capacity {self.capacity}")
        if span > self.span:
            self.k[:, :, :, self.span:span] = 0
            self.v[:, :, :, self.span:span] = 0
            self.span = span

    def put(self, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Row ``row`` := a prompt's keys / values ``[layers, kv_heads, P, head_dim]`` (no padding)."""
        if self.pk is not None:
            raise ValueError("KVCache.put: this cache keeps its prompts shared (set_prefixes); put() writes a "
                             "prompt into a row of a cache without shared prompts")
        P = keys.shape[-2]
        self.grow(P)
        self.k[:, row, :, :P] = keys
        self.v[:, row, :, :P] = values
        self.bias[row] = float("-inf")
        self.bias[row, :P] = 0
        self.end[row] = P
        self.pos[row] = P

    def compact(self, keep: torch.Tensor) -> torch.Tensor:
        """Drop the rows where ``keep [B]`` is False: the last kept rows move into the holes, so only the moved
        rows' filled columns are copied (not the whole cache), and the buffers shrink to a view of their first
        rows. Returns ``perm [n]``: new row i holds old row ``perm[i]``."""
        n = int(keep.sum())
        holes = (~keep[:n]).nonzero().squeeze(-1)
        movers = keep[n:].nonzero().squeeze(-1) + n
        perm = torch.arange(n, device=keep.device)
        if len(holes):
            s = self.span
            self.k[:, holes, :, :s] = self.k[:, movers, :, :s]
            self.v[:, holes, :, :s] = self.v[:, movers, :, :s]
            for name in ("bias", "end", "pos", "pref"):
                t = getattr(self, name)
                if t is not None:
                    t[holes] = t[movers]
            perm[holes] = movers
        self.k, self.v = self.k[:, :n], self.v[:, :n]
        self.bias, self.end, self.pos = self.bias[:n], self.end[:n], self.pos[:n]
        if self.pref is not None:
            self.pref = self.pref[:n].clone()  # a new tensor: prefix_layout() sees the change
        return perm


class FusedLlama:
    """The decode path of one Llama-family HF model: :meth:`prefill` prompts into rows of a :class:`KVCache`,
    then :meth:`decode` one token per row. Both return the last position's logits ``[rows, vocab]``.

    The weights are the model's tensors (norms, embeddings, LM head, o_proj, down_proj: the tensors
    themselves, except that a PEFT model's LoRA adapters are merged into copies of the projections) plus concatenated q|k|v and gate|up copies (or, with ``prepack``, oneDNN-packed copies of
    every weight matrix instead) that :meth:`refresh` re-copies (call it before each generation; the
    Generator does) and :meth:`release` frees (after it: the update does not need them). A :meth:`prefill`
    after :meth:`release` refreshes first.

    ``compile=True`` runs the decoder layers of :meth:`decode` through ``torch.compile`` (dynamic shapes).
    Off by default: on the 2-core CPU (SmolLM2-135M shapes, B=64, 50-token cache, 2 threads) the compiled
    step took 350-377 ms against 150-170 ms eager, after 95 s of compilation.

    ``prepack``: run the linear layers through oneDNN with weights reordered by :meth:`refresh` (see the
    module docstring). ``None`` (default): on for a float32 model on CPU with a hidden size of at least
    ``PREPACK_MIN_HIDDEN`` when :func:`prepack_available`, and not with ``compile``. The packed copies hold
    as much memory as the weights until :meth:`release`; the concatenated copies are then not kept (the
    packed ones are made from them), so a generation holds the weights plus one copy of them.
    """

    def __init__(self, model, compile: bool = False, prepack: bool | None = None):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"FusedLlama: unsupported model ({reason})")
        self.model = model
        self.base = base = base_model(model)  # a PEFT model's adapters are merged into copies by refresh()
        self.family = FAMILIES[type(base).__name__]
        cfg = base.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.group = self.n_heads // self.n_kv
        self.scale = self.head_dim ** -0.5
        self.eps = cfg.rms_norm_eps
        self.inner = base.model
        self.layers: list = []
        self.intermediate = self.inner.layers[0].mlp.gate_proj.out_features
        self._fused: list[dict] = []
        self._cos = self._sin = None
        w = base.get_output_embeddings().weight
        auto = (w.device.type == "cpu" and w.dtype == torch.float32 and not compile
                and cfg.hidden_size >= PREPACK_MIN_HIDDEN)
        if prepack and not prepack_available():
            raise ValueError("FusedLlama(prepack=True): this torch build has no oneDNN prepacked linear "
                             "(torch.backends.mkldnn); use prepack=None or False")
        self.prepack = bool(prepack) if prepack is not None else auto and prepack_available()
        self._head_packed: torch.Tensor | None = None
        self._ready = False  # the copies of refresh() exist (release() frees them)
        self._decode_layers = (torch.compile(self._decode_layers_eager, dynamic=True) if compile
                               else self._decode_layers_eager)
        self.refresh()

    # ----- weights ------------------------------------------------------------------------------------------

    def _sources(self, layer) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(weight, bias) of q, k, v, gate, up, o, down as the layer applies them (LoRA merged)."""
        a, m = layer.self_attn, layer.mlp
        return [_effective(p) for p in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj, a.o_proj,
                                        m.down_proj)]

    def refresh(self) -> None:
        """Copy the current q|k|v and gate|up weights into the fused matrices (all layers, every call), or with
        ``prepack`` pack every weight matrix (q|k|v and gate|up from a temporary concatenation, not kept).

        Always a copy, never a check: an optimizer may update the weights in place without a trace (fused
        AdamW leaves the tensors' ``_version`` unchanged), and the copy costs about 10 ms for SmolLM2-135M
        on one CPU thread, against seconds for a generation."""
        layers = list(self.inner.layers)
        if len(layers) != len(self.layers) or any(a is not b for a, b in zip(layers, self.layers)):
            self.layers, self._fused = layers, [{} for _ in layers]
        with torch.no_grad():
            for layer, f in zip(self.layers, self._fused):
                (qw, qb), (kw, kb), (vw, vb), (gw, gb), (uw, ub), (ow, ob), (dw, db) = self._sources(layer)
                f["o_b"], f["down_b"] = ob, db
                if self.prepack:
                    f["qkv_p"], f["gu_p"] = _pack(torch.cat([qw, kw, vw])), _pack(torch.cat([gw, uw]))
                    f["o_p"], f["down_p"] = _pack(ow), _pack(dw)
                else:
                    _cat_into(f, "qkv_w", [qw, kw, vw])
                    _cat_into(f, "gu_w", [gw, uw])
                    f["o_w"], f["down_w"] = ow, dw  # the layer's own tensors, or merged LoRA copies
                _cat_into(f, "qkv_b", [b if b is not None else w.new_zeros(w.shape[0])
                                       for b, w in ((qb, qw), (kb, kw), (vb, vw))]
                          if any(b is not None for b in (qb, kb, vb)) else None)
                _cat_into(f, "gu_b", [b if b is not None else w.new_zeros(w.shape[0]) for b, w in ((gb, gw), (ub, uw))]
                          if gb is not None or ub is not None else None)
            if self.prepack:
                self._head_packed = _pack(self.base.get_output_embeddings().weight)
        self._ready = True

    def release(self) -> None:
        """Free the weight copies, packed or concatenated (after a generation: the update does not need them,
        and :meth:`refresh` copies the updated weights again; the next :meth:`prefill` does it if nobody
        did). For SmolLM2-135M that is 280 MB of q|k|v and gate|up, or 540 MB of packed weights."""
        for f in self._fused:
            for key in ("qkv_w", "gu_w", "o_w", "down_w", "qkv_p", "gu_p", "o_p", "down_p"):
                f.pop(key, None)
        self._head_packed = None
        self._ready = False

    def _rotary(self, length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos / signed sin tables ``[>= length, head_dim]`` from the model's own rotary module (its scaling
        included; the sin table's first half negated, see :func:`_rotate`), grown by doubling."""
        if self._cos is None or self._cos.shape[0] < length or self._cos.device != device:
            n = max(length, 2 * (self._cos.shape[0] if self._cos is not None else 64))
            dummy = torch.zeros(1, 1, self.head_dim, device=device, dtype=dtype)
            cos, sin = self.inner.rotary_emb(dummy, torch.arange(n, device=device)[None])
            half = self.head_dim // 2
            self._cos, self._sin = cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)
        return self._cos, self._sin

    def new_cache(self, batch: int, capacity: int, positions: int = 0) -> KVCache:
        """A cache of ``batch`` rows x ``capacity`` columns, with rotary tables for ``max(capacity,
        positions)`` positions (a cache with shared prompts holds only the generated tokens in its rows, whose
        positions continue after the prompt's)."""
        w = self.inner.embed_tokens.weight
        self._rotary(max(capacity, positions), w.device, w.dtype)
        return KVCache(len(self.layers), batch, self.n_kv, capacity, self.head_dim, w.dtype, w.device)

    # ----- forward ------------------------------------------------------------------------------------------

    def _qkv(self, layer, f, x, cos, sin):
        """x [..., D] -> q [..., H, d], k / v [..., kv, d], q and k rotated by ``cos / sin`` (broadcast over the
        heads); Qwen3's q/k norms applied before the rotation. Without q/k norms, q and k are adjacent columns of
        the fused product and are rotated as one tensor."""
        a = _rms(x, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        qkv = _linear(a, f.get("qkv_w"), f["qkv_b"], f.get("qkv_p"))
        hq, hk = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        v = qkv[..., hq + hk:].unflatten(-1, (self.n_kv, self.head_dim))
        if self.family == "qwen3":
            an = layer.self_attn
            q = _rms(qkv[..., :hq].unflatten(-1, (self.n_heads, self.head_dim)), an.q_norm.weight,
                     an.q_norm.variance_epsilon)
            k = _rms(qkv[..., hq:hq + hk].unflatten(-1, (self.n_kv, self.head_dim)), an.k_norm.weight,
                     an.k_norm.variance_epsilon)
            return _rotate(q, cos, sin), _rotate(k, cos, sin), v
        qk = _rotate(qkv[..., :hq + hk].unflatten(-1, (self.n_heads + self.n_kv, self.head_dim)), cos, sin)
        return qk[..., :self.n_heads, :], qk[..., self.n_heads:, :], v

    def _finish_layer(self, layer, f, x, attn_out):
        """Residual after attention (o_proj), then the SiLU MLP and its residual."""
        x = x + _linear(attn_out, f.get("o_w"), f["o_b"], f.get("o_p"))
        a = _rms(x, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        gu = _linear(a, f.get("gu_w"), f["gu_b"], f.get("gu_p"))
        h = F.silu(gu[..., :self.intermediate]).mul_(gu[..., self.intermediate:])
        return x + _linear(h, f.get("down_w"), f["down_b"], f.get("down_p"))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = _rms(x, self.inner.norm.weight, self.inner.norm.variance_epsilon)
        head = self.base.get_output_embeddings()
        return _linear(x, head.weight, head.bias, self._head_packed)

    def prefill(self, cache: KVCache, rows: torch.Tensor, ids: torch.Tensor, attn: torch.Tensor,
                expand: torch.Tensor | None = None, shared: bool = False) -> torch.Tensor:
        """Run left-padded prompts ``ids / attn [n, P]`` and store their keys / values in cache rows ``rows``
        (columns ``[0, P)``; the row's older entries are invalidated). ``expand [len(rows)]``: which of the
        n prompts each row receives (prefix sharing: a prompt repeated in a group is run once); default
        the identity. Returns the last position's logits ``[len(rows), vocab]``.

        ``shared=True`` (every row of the cache at once): the n prompts' keys / values are kept once
        (:meth:`KVCache.set_prefixes`) and read once per decode step for all the rows of a prompt; the rows'
        own columns start empty."""
        n, P = ids.shape
        if not self._ready:
            self.refresh()
        if shared and len(rows) != cache.batch:
            raise ValueError(f"FusedLlama.prefill(shared=True) fills every row of the cache at once: got "
                             f"{len(rows)} rows for a cache of {cache.batch}")
        cos_t, sin_t = self._rotary(P, ids.device, cache.k.dtype)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        cos, sin = cos_t[positions][:, :, None], sin_t[positions][:, :, None]  # [n, P, 1, d]
        keys = attn.bool()
        causal = torch.ones(P, P, dtype=torch.bool, device=ids.device).tril()
        # a padding query sees itself, so that no row of the softmax is empty (no NaN in the padded K/V)
        mask = (causal & keys[:, None, :]) | torch.eye(P, dtype=torch.bool, device=ids.device)
        mask = mask[:, None]  # [n, 1, P, P]
        x = self.inner.embed_tokens(ids)
        if shared:
            cache.set_prefixes(n, P)
        else:
            cache.grow(P)  # columns [span, P) of the other rows become readable: keep them finite
        for i, layer in enumerate(self.layers):
            f = self._fused[i]
            q, k, v = self._qkv(layer, f, x, cos, sin)  # [n, P, heads, d]
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            v = v.transpose(1, 2)
            if shared:
                cache.pk[i] = k
                cache.pv[i] = v
            else:
                kr, vr = (k, v) if expand is None else (k[expand], v[expand])
                cache.k[i, rows, :, :P] = kr
                cache.v[i, rows, :, :P] = vr
            if self.group > 1:
                k, v = k.repeat_interleave(self.group, dim=1), v.repeat_interleave(self.group, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
            x = self._finish_layer(layer, f, x, o.transpose(1, 2).flatten(2))
        if shared:  # the prompts' columns are shared; the rows' own columns start empty
            cache.pbias.masked_fill_(keys, 0.0)
            cache.pref[rows] = torch.arange(n, device=ids.device) if expand is None else expand
            cache.bias[rows] = float("-inf")
            cache.end[rows] = 0
        else:
            bias = torch.full((len(rows), cache.capacity), float("-inf"), dtype=cache.bias.dtype, device=ids.device)
            bias[:, :P] = torch.zeros((), dtype=bias.dtype, device=ids.device).masked_fill(
                ~(keys if expand is None else keys[expand]), float("-inf"))
            cache.bias[rows] = bias
            cache.end[rows] = P
        n_real = attn.sum(-1)
        cache.pos[rows] = n_real if expand is None else n_real[expand]
        logits = self._logits(x[:, -1])
        return logits if expand is None else logits[expand]

    def _attend(self, q, k, v, mask):
        """Attention of ``q [B, kv, g, d]`` (already multiplied by the softmax scale ``1 / sqrt(d)``) over ``k / v
        [B, kv, span, d]`` with the additive ``mask``.

        On CPU as two matrix products and a softmax (in float32, as transformers' eager attention): for one
        query per row this is 2.4x faster than ``scaled_dot_product_attention``'s CPU kernel (165 vs 400 us
        per layer at SmolLM2's shapes, B=64, 2 threads); elsewhere ``scaled_dot_product_attention``."""
        if q.device.type != "cpu":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        scores = torch.matmul(q, k.transpose(-1, -2)).add_(mask)
        return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(q.dtype), v)

    def _attend_shared(self, q, k, v, mask, pk, pv, pmask, layout):
        """Cascade attention: ``q [B, kv, g, d]`` (already scaled, as in :meth:`_attend`) over its prompt's keys /
        values ``pk / pv [n, kv, P, d]`` (shared by the rows of that prompt; additive mask ``pmask [n, 1, 1, P]``) and its own ``k / v
        [B, kv, s, d]`` (``mask [B, 1, 1, s]``); ``layout = (n, m, slot_pos)`` from
        :meth:`KVCache.prefix_layout`.

        The rows of a prompt are stacked as ``m * g`` query positions of one block, so that a prompt's keys
        and values are read once per step. Each part is exponentiated against its own maximum and the two
        are joined as in a split softmax: with ``M`` the larger maximum, ``out = (e^(m_p - M) E_p V_p +
        e^(m_s - M) E_s V_s) / (e^(m_p - M) Z_p + e^(m_s - M) Z_s)``, the attention over the concatenated
        cache to float rounding (softmax in float32, as :meth:`_attend`)."""
        B, kv, g, d = q.shape
        n, m, slot_pos = layout
        if slot_pos is None:  # row b is slot b
            blocks = q
        else:
            blocks = q.new_zeros((n * m, kv, g, d))
            blocks[slot_pos] = q
        blocks = blocks.view(n, m, kv, g, d).transpose(1, 2).reshape(n, kv, m * g, d)
        sp = torch.matmul(blocks, pk.transpose(-1, -2)).float().add_(pmask)  # [n, kv, m*g, P]
        mp = sp.amax(-1, keepdim=True)
        ep = sp.sub_(mp).exp_()
        zp = ep.sum(-1, keepdim=True)
        op = torch.matmul(ep.to(q.dtype), pv)  # [n, kv, m * g, d]

        def rows(t):  # block layout [n, kv, m * g, x] -> the rows' [B, kv, g, x]
            t = t.view(n, kv, m, g, t.shape[-1]).transpose(1, 2).reshape(n * m, kv, g, t.shape[-1])
            return t if slot_pos is None else t[slot_pos]

        op, mp, zp = rows(op), rows(mp), rows(zp)
        ss = torch.matmul(q, k.transpose(-1, -2)).float().add_(mask)  # [B, kv, g, s]
        ms = ss.amax(-1, keepdim=True)
        es = ss.sub_(ms).exp_()
        zs = es.sum(-1, keepdim=True)
        os_ = torch.matmul(es.to(q.dtype), v)
        top = torch.maximum(mp, ms)
        wp, ws = (mp - top).exp_(), (ms - top).exp_()
        norm = (wp * zp + ws * zs).reciprocal_()
        return (op.float() * (wp * norm) + os_.float() * (ws * norm)).to(q.dtype)

    def _decode_layers_eager(self, x, cos, sin, rows, end, mask, keys, values, shared=None):
        """The decoder layers for one token per row: ``x [B, D]``, rotary ``cos / sin [B, 1, d]``, the cache
        entries to write ``[rows, :, end]`` (``rows [B]`` with ``end [B]``, or ``:`` with one int column when every
        row writes the same column: a strided copy instead of an indexed write), ``mask [B, 1, 1, span]``, cache
        views ``[layers, B, kv, span, d]``. ``shared``: ``(pk, pv, pmask, layout)`` of a cache with shared prompts.
        Returns the last hidden states ``[B, D]``."""
        B = x.shape[0]
        for i, layer in enumerate(self.layers):
            f = self._fused[i]
            q, k, v = self._qkv(layer, f, x, cos, sin)  # [B, heads, d]
            ck, cv = keys[i], values[i]
            ck[rows, :, end] = k
            cv[rows, :, end] = v
            # the g query heads of one KV head as g query positions: grouped-query attention without repeat;
            # the softmax scale applied to the queries once (fewer elements than the scores)
            qg = (q * self.scale).view(B, self.n_kv, self.group, self.head_dim)
            o = (self._attend(qg, ck, cv, mask) if shared is None
                 else self._attend_shared(qg, ck, cv, mask, shared[0][i], shared[1][i], shared[2], shared[3]))
            x = self._finish_layer(layer, f, x, o.reshape(B, self.n_heads * self.head_dim))
        return x

    def decode(self, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
        """One token per cache row (``tokens [B]``): append its keys / values at each row's ``end`` and return
        the next-token logits ``[B, vocab]``."""
        if not self._ready:  # released since the prefill: the same weights, copied again
            self.refresh()
        B = tokens.shape[0]
        end, pos = cache.end, cache.pos
        lo, hi = (int(e) for e in torch.aminmax(end))
        span = hi + 1
        cache.grow(span)
        # where the new keys / values go: every row at one column (GRPO's batches, any batch without refills) is a
        # strided copy; otherwise an indexed write per row
        rows, at = (slice(None), hi) if lo == hi else (torch.arange(B, device=tokens.device), end)
        cache.bias[rows, at] = 0
        mask = cache.bias[:, None, None, :span]  # [B, 1, 1, span]: a view of the persistent additive mask
        shared = None
        if cache.pk is not None:
            shared = (cache.pk, cache.pv, cache.pbias[:, None, None, :], cache.prefix_layout())
        cos, sin = self._cos[pos][:, None], self._sin[pos][:, None]  # [B, 1, d]
        x = self.inner.embed_tokens(tokens)
        x = self._decode_layers(x, cos, sin, rows, at, mask, cache.k[..., :span, :], cache.v[..., :span, :], shared)
        cache.end = end + 1
        cache.pos = pos + 1
        return self._logits(x)
