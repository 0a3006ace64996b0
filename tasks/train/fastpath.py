"""The fast QLoRA training path (issue 6), switched by the ``train`` section of the config.

Five independent pieces, each correct on its own and each measured in benchmarks/BENCH_NOTES.md:

- **varlen attention** (``train.attention``): packed rows go to a variable-length flash kernel
  (``torch.nn.attention.varlen.varlen_attn``) with ``cu_seqlens`` built from the position ids, so
  attention stays inside each document without a 4D mask (a mask knocks SDPA off its flash kernel).
  Registered as the transformers attention implementation ``d2a_varlen``; where the kernel is not
  available (CPU, no varlen in torch) the same function computes SDPA with the per-document mask.
- **fast LoRA** (``train.fast_lora``): one autograd function per LoRA-wrapped NF4 linear. It saves
  the layer input (one storage shared by q, k and v, which read the same tensor), the small
  x·Aᵀ and the seed of the dropout mask, never a dequantized weight or a float32/dropped copy of x;
  the backward dequantizes W again. PEFT's module tree is untouched (adapters save and load as before).
- **Triton kernels** (``train.triton_kernels``, tasks/train/kernels.py): every frozen 4-bit linear (the LoRA
  ones and o/gate/up/down) dequantizes its weight in one kernel, bit-equal to bitsandbytes', in forward
  and backward; the LoRA dropout mask is drawn and applied in one pass from (seed, element index).
- **selective recomputation** (``train.recompute_layers``): checkpoint only the first N decoder layers.
- **activation offload** (``train.activation_offload``): the inputs that gradient checkpointing keeps
  per layer go to pinned CPU memory on a side stream and come back one layer ahead of the backward.
"""

from __future__ import annotations

import collections
import inspect
import logging
import types
import weakref
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tasks.train import kernels

log = logging.getLogger(__name__)

VARLEN_ATTN = "d2a_varlen"


# ----------------------------------------------------------------------------- resolution
@dataclass(frozen=True)
class FastPath:
    """The switches as they apply on this machine (``resolve`` turns 'auto' into on/off)."""

    attention: str  # "varlen" | "sdpa"
    liger: bool
    fast_lora: bool
    recompute: bool
    recompute_layers: int | None
    offload: bool
    kernels: bool = False

    @property
    def attn_implementation(self) -> str | None:
        """What from_pretrained gets: our varlen function, or None for transformers' default (SDPA + mask)."""
        return VARLEN_ATTN if self.attention == "varlen" else None

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())


def varlen_kernel():
    """torch's variable-length flash attention, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def liger_available() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(tc, cuda: bool | None = None, fsdp: bool = False) -> FastPath:
    """Turn the train config's switches into what runs here. 'auto' means on where it is correct and
    available: varlen and liger need CUDA; fast LoRA is kept off under FSDP (untested with flattened
    parameters), offload needs CUDA to have anywhere faster to offload from."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    attention = tc.attention
    if attention == "auto":
        attention = "varlen" if cuda and varlen_kernel() is not None else "sdpa"
    liger = tc.liger_kernel
    if liger == "auto":
        liger = cuda and liger_available()
    offload = bool(tc.activation_offload and cuda)
    triton_on = tc.triton_kernels
    if triton_on == "auto":
        triton_on = cuda and kernels.triton is not None
    elif triton_on and kernels.triton is None:
        raise ValueError("train.triton_kernels=true needs Triton (pip install triton)")
    if tc.activation_offload and not cuda:
        log.warning("train.activation_offload: no CUDA device, nothing to offload from; ignored")
    return FastPath(attention=attention, liger=bool(liger), fast_lora=bool(tc.fast_lora and not fsdp),
                    recompute=tc.gradient_checkpointing,
                    recompute_layers=tc.recompute_layers if tc.gradient_checkpointing else None, offload=offload,
                    kernels=bool(triton_on and not fsdp))


def prepare_base(model, fp: FastPath):
    """Recomputation (all or the first N decoder layers) and activation offload, on the loaded base
    (before PEFT wraps it). Returns the offloader, or None."""
    model.config.use_cache = False
    if fp.recompute:
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:  # transformers 5.17 (the GPU machine)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        model.enable_input_require_grads()
        if fp.recompute_layers is not None:
            set_recompute_layers(model, fp.recompute_layers)
    return ActivationOffload.install(model) if fp.offload else None


def prepare_peft(peft_model, fp: FastPath) -> int:
    """The fast LoRA forward on every LoRA-wrapped 4-bit linear, and with ``kernels`` the one-kernel
    dequantization on the other frozen 4-bit linears; returns how many LoRA layers were switched."""
    if fp.kernels:
        enable_fast_nf4(peft_model)
    return enable_fast_lora(peft_model, kernels=fp.kernels) if fp.fast_lora else 0


# ------------------------------------------------------------------------ varlen attention
def doc_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Where a new document begins in each packed row: the row start, and wherever the position
    does not continue the previous one (transformers' own rule for packed rows, so this path and the
    mask path agree: a position reset to 0, a padding segment, a row that starts mid-document)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative document lengths over the flattened (batch x seq) tokens, int32, as flash varlen
    kernels take them: [0, end of doc 1, ..., batch*seq]. Rows never join (a document cut at the end
    of a row and continued on the next is two sequences, as the mask path treats it)."""
    starts = doc_starts(position_ids).flatten()
    idx = torch.nonzero(starts, as_tuple=False).flatten()
    total = torch.tensor([starts.numel()], device=idx.device, dtype=idx.dtype)
    return torch.cat([idx, total]).to(torch.int32)


_cu_cache: dict[str, Any] = {"pos": None, "shape": None, "cu": None}


def _cu_for(position_ids: torch.Tensor | None, b: int, s: int, device) -> torch.Tensor:
    """cu_seqlens for the model's ``position_ids`` (None: one sequence a row).

    Every layer (and every recomputed layer) of one forward gets the same position_ids object, so
    the nonzero behind cu_seqlens, a host sync, runs once per forward. Keyed on that object as the
    model passes it (a view made here would be new in every layer: one sync per layer measured
    ~95 ms of GPU idle a step on Mistral-Small-24B). The cache holds the tensor, so its id is never
    reused while cached."""
    if position_ids is None:  # no documents: row boundaries only, no sync
        return torch.arange(0, b * s + 1, s, device=device, dtype=torch.int32)
    key = (b, s, position_ids._version)  # _version: the same tensor changed in place is another batch
    if _cu_cache["pos"] is position_ids and _cu_cache["shape"] == key:
        return _cu_cache["cu"]
    cu = cu_seqlens_from_position_ids(position_ids.expand(b, s))
    _cu_cache.update(pos=position_ids, shape=key, cu=cu)
    return cu


def doc_causal_mask(position_ids: torch.Tensor, key_valid: torch.Tensor | None = None,
                    sliding_window: int | None = None) -> torch.Tensor:
    """(B, 1, S, S) boolean mask: causal and inside one document (and within the window, and not
    on padding keys). The diagonal stays on so a fully padded query row is not NaN."""
    doc = doc_starts(position_ids).cumsum(-1)
    s = position_ids.shape[-1]
    i = torch.arange(s, device=position_ids.device)
    causal = i[None, :] <= i[:, None]
    if sliding_window is not None:
        causal &= (i[:, None] - i[None, :]) < sliding_window
    m = (doc[:, :, None] == doc[:, None, :]) & causal[None]
    if key_valid is not None:
        m &= key_valid[:, None, :].bool()
    m |= torch.eye(s, dtype=torch.bool, device=m.device)[None]
    return m[:, None]


_varlen_params: set[str] | None = None


def _varlen_call(q, k, v, cu, max_len, scale, sliding_window):
    """varlen_attn across torch versions: 2.9 takes is_causal, 2.10+ window_size (and later
    enable_gqa). The flash kernel itself handles fewer KV heads than query heads (GQA)."""
    global _varlen_params
    fn = varlen_kernel()
    if _varlen_params is None:
        _varlen_params = set(inspect.signature(fn).parameters)
    kw: dict[str, Any] = {}
    if "window_size" in _varlen_params:
        kw["window_size"] = (-1 if sliding_window is None else sliding_window - 1, 0)
    else:
        kw["is_causal"] = True
    if "scale" in _varlen_params:
        kw["scale"] = scale
    if "enable_gqa" in _varlen_params and q.shape[1] != k.shape[1]:
        kw["enable_gqa"] = True
    return fn(q, k, v, cu, cu, max_len, max_len, **kw)


def _varlen_ok(query, attention_mask, dropout, scaling, sliding_window) -> bool:
    if attention_mask is not None or dropout or not query.is_cuda or query.dtype not in (torch.bfloat16, torch.float16):
        return False
    fn = varlen_kernel()
    if fn is None:
        return False
    params = _varlen_params if _varlen_params is not None else set(inspect.signature(fn).parameters)
    if sliding_window is not None and "window_size" not in params:
        return False
    return "scale" in params or scaling is None or abs(scaling - query.shape[-1] ** -0.5) < 1e-12


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window: int | None = None, **kwargs):
    """A transformers attention function (AttentionInterface) for packed rows.

    query (B, Hq, S, D), key/value (B, Hkv, S, D); returns ((B, S, Hq, D), None) like the built-in
    ones. Documents are read from ``position_ids``; ``attention_mask`` is None or a 2D padding mask
    (registered with flash_attention_mask, which passes padding through and drops the rest)."""
    b, hq, s, d = query.shape
    if sliding_window is not None and sliding_window >= s:
        sliding_window = None  # a window longer than the row changes nothing
    given = kwargs.get("position_ids")
    if _varlen_ok(query, attention_mask, dropout, scaling, sliding_window):
        cu = _cu_for(given, b, s, query.device)
        # (B, H, S, D) -> (B*S, H, D): the layout flash kernels read
        q = query.transpose(1, 2).reshape(b * s, hq, d)
        k = key.transpose(1, 2).reshape(b * s, key.shape[1], d)
        v = value.transpose(1, 2).reshape(b * s, value.shape[1], d)
        # max_len is an upper bound (the row length): the true maximum would cost a host sync per layer
        out = _varlen_call(q, k, v, cu, s, scaling, sliding_window)
        return out.view(b, s, hq, d), None
    position_ids = (torch.arange(s, device=query.device)[None] if given is None else given).expand(b, s)
    key_valid = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"{VARLEN_ATTN}: expected a 2D padding mask or None, got {tuple(attention_mask.shape)}")
        key_valid = attention_mask[:, -key.shape[2]:].bool()
    if key.shape[2] != s:  # decoding with a KV cache: the new queries see the whole cache, causally
        kv = key.shape[2]
        i, j = torch.arange(kv - s, kv, device=query.device), torch.arange(kv, device=query.device)
        mask = (j[None, :] <= i[:, None])[None, None]
        if key_valid is not None:
            mask = mask & key_valid[:, None, None, :]
    else:
        mask = doc_causal_mask(position_ids, key_valid, sliding_window)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout if module is None or module.training else 0.0,
        scale=scaling, enable_gqa=key.shape[1] != hq)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Make ``attn_implementation="d2a_varlen"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTN, varlen_attention_forward)
    try:  # padding masks pass through as 2D (as for flash attention); without it they would be dropped
        from transformers.masking_utils import (
            AttentionMaskInterface,
            flash_attention_mask,
        )

        AttentionMaskInterface.register(VARLEN_ATTN, flash_attention_mask)
    except ImportError:
        log.warning("transformers has no flash_attention_mask: %s ignores 2D padding masks", VARLEN_ATTN)
    return VARLEN_ATTN


register_attention()


# ---------------------------------------------------------------------------- fast LoRA
def _draw_seed() -> int:
    # from torch's CPU generator: follows torch.manual_seed, and gradient checkpointing restores
    # it for the recompute, so the recomputed forward draws the same mask
    return int(torch.randint(0, 2**62, (1,)).item())


def dropout_mask(shape, p: float, seed: int, device, dtype) -> torch.Tensor:
    """The 0/1 keep mask of dropout(p), in x's dtype, regenerated from its seed (forward and backward
    draw the same). The 1/(1-p) rescaling is folded into the LoRA scaling: one pass fewer over x."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    try:
        return torch.empty(shape, device=device, dtype=dtype).bernoulli_(1.0 - p, generator=g)
    except (RuntimeError, NotImplementedError):  # no bernoulli_ for this dtype here: draw in float32
        return torch.empty(shape, device=device, dtype=torch.float32).bernoulli_(1.0 - p, generator=g).to(dtype)


def _dequantize(weight, quant_state, use_kernels: bool = False) -> torch.Tensor:
    """The (out, in) weight, as bnb's own backward dequantizes it (Triton's one kernel, bit-equal, when on)."""
    if use_kernels:
        return kernels.dequantize_nf4(weight, quant_state)
    import bitsandbytes.functional as F

    return F.dequantize_4bit(weight.view(-1, 1), quant_state)


def _linear4(x: torch.Tensor, weight, quant_state, use_kernels: bool) -> torch.Tensor:
    """x·deq(W)ᵀ without autograd: the Triton dequantization + a bf16 GEMM, or bitsandbytes' own."""
    if use_kernels:
        return torch.nn.functional.linear(x, _dequantize(weight, quant_state, True).to(x.dtype))
    import bitsandbytes as bnb

    return bnb.matmul_4bit(x, weight, quant_state=quant_state)  # called in no-grad: bnb's inference kernel


def _drop(x: torch.Tensor, p: float, seed: int, use_kernels: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """x with dropout(p)'s dropped elements zeroed (no rescaling), the same elements for the same seed
    and shape: in one Triton pass where on, else torch's bernoulli from a seeded generator."""
    if use_kernels:
        return kernels.dropout_keep(x, p, seed, out=out)
    keep = dropout_mask(x.shape, p, seed, x.device, x.dtype)
    return x.mul_(keep) if out is x else torch.mul(x, keep, out=out)


class NF4Linear(torch.autograd.Function):
    """y = x·deq(W)ᵀ for a frozen bitsandbytes 4-bit W, dequantized by the Triton kernel in the forward
    and again in the backward; nothing but references is saved (as bnb's own MatMul4Bit)."""

    @staticmethod
    def forward(ctx, x, weight, quant_state):
        ctx.weight, ctx.quant_state = weight, quant_state
        return _linear4(x, weight, quant_state, True)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return torch.matmul(grad, _dequantize(ctx.weight, ctx.quant_state, True).to(grad.dtype)), None, None


class QLoraLinear(torch.autograd.Function):
    """y = x·deq(W)ᵀ + s·(drop(x)·Aᵀ)·Bᵀ for a frozen bitsandbytes 4-bit W.

    Saved: x (the storage the caller already holds; q, k and v share it), h = drop(x)·Aᵀ (r values a
    token), A, B and the dropout seed. Not saved: any dequantized weight, a float32 or dropped copy of
    x. The LoRA matmuls run in x's dtype (bf16 on GPU), their gradients are returned in A's/B's dtype."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, weight, quant_state, scaling: float, p: float, seed: int, use_kernels: bool):
        out = _linear4(x, weight, quant_state, use_kernels)
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        xd = _drop(x, p, seed, use_kernels) if p > 0 else x
        h = xd @ a.t()
        del xd
        scaling = scaling / (1.0 - p)  # dropout's rescaling, applied on r values instead of on x
        out = out.to(x.dtype)
        out.add_(h @ b.t(), alpha=scaling)
        ctx.save_for_backward(x, lora_a, lora_b, h)
        ctx.weight, ctx.quant_state, ctx.scaling, ctx.p, ctx.seed = weight, quant_state, scaling, p, seed
        ctx.use_kernels = use_kernels
        return out

    @staticmethod
    def backward(ctx, grad):
        x, lora_a, lora_b, h = ctx.saved_tensors
        dt = x.dtype
        g = grad.to(dt).reshape(-1, grad.shape[-1])
        x2, h2 = x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1])
        a, b = lora_a.to(dt), lora_b.to(dt)
        p, seed, uk = ctx.p, ctx.seed, ctx.use_kernels
        gh = (g @ b).mul_(ctx.scaling)  # dL/dh
        grad_b = (g.t() @ h2).mul_(ctx.scaling) if ctx.needs_input_grad[2] else None
        # the forward's mask again, from its seed: x2 and lora_x have x's shape, so the same elements drop
        grad_a = gh.t() @ (_drop(x2, p, seed, uk) if p > 0 else x2) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = _dequantize(ctx.weight, ctx.quant_state, uk).to(dt)
            lora_x = gh @ a
            if p > 0:
                _drop(lora_x, p, seed, uk, out=lora_x)
            grad_x = torch.addmm(lora_x, g, w).reshape(x.shape)
            del w
        return (grad_x, None if grad_a is None else grad_a.to(lora_a.dtype),
                None if grad_b is None else grad_b.to(lora_b.dtype), None, None, None, None, None, None)


def _fast_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Replaces PEFT's lora.bnb.Linear4bit.forward on one instance; anything the function does not
    cover (no grad, several/mixed adapters, merged, DoRA and other variants, CPU-repacked weights)
    goes to PEFT's own forward."""
    plain = type(self).forward
    if args or kwargs or not torch.is_grad_enabled() or self.disable_adapters or self.merged:
        return plain(self, x, *args, **kwargs)
    active = [a for a in self.active_adapters if a in self.lora_A]
    if len(active) != 1 or active[0] in getattr(self, "lora_variant", {}):
        return plain(self, x, *args, **kwargs)
    name = active[0]
    base = self.base_layer
    weight = base.weight
    qs = getattr(weight, "quant_state", None)
    if qs is None or getattr(qs, "packing_format_for_cpu", False) or getattr(self, "lora_bias", {}).get(name, False):
        return plain(self, x, *args, **kwargs)
    try:  # bitsandbytes' own forward does this first (a quant state lost by some wrappers is restored)
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        fix_4bit_weight_quant_state_from_module(base)
        qs = weight.quant_state
    except ImportError:
        pass
    drop = self.lora_dropout[name]
    p = float(drop.p) if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0
    compute = getattr(base, "compute_dtype", None) or x.dtype
    inp_dtype = x.dtype  # returned in the caller's dtype, as PEFT's and bitsandbytes' forwards do
    x = x.to(compute)
    use_kernels = bool(getattr(self, "_d2a_kernels", False)) and kernels.dequant_supported(weight, qs)
    if use_kernels and not x.is_contiguous():  # the dropout mask follows the element index
        x = x.contiguous()
    out = QLoraLinear.apply(x, self.lora_A[name].weight, self.lora_B[name].weight, weight, qs,
                            float(self.scaling[name]), p, _draw_seed() if p > 0 else 0, use_kernels)
    if base.bias is not None:
        out = out + base.bias.to(out.dtype)
    return out.to(inp_dtype)


def enable_fast_lora(model, kernels: bool = False) -> int:
    """Switch every PEFT LoRA layer over a bitsandbytes 4-bit linear to the fused function (with the
    Triton kernels when ``kernels``). The module tree, parameter names and PEFT's save/load stay
    exactly as they were."""
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    n = 0
    for mod in model.modules():
        if isinstance(mod, LoraLinear4bit) and "forward" not in mod.__dict__:
            mod.forward = types.MethodType(_fast_lora_forward, mod)
            mod._d2a_kernels = kernels
            n += 1
    return n


def _fast_nf4_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Replaces bitsandbytes' Linear4bit.forward on one frozen instance while training: the same
    product through NF4Linear (one-kernel dequantization). Inference, extra arguments and layouts the
    kernel does not read go to bitsandbytes' own forward."""
    weight = self.weight
    qs = getattr(weight, "quant_state", None)
    if args or kwargs or not torch.is_grad_enabled() or qs is None or not kernels.dequant_supported(weight, qs):
        return type(self).forward(self, x, *args, **kwargs)
    compute = getattr(self, "compute_dtype", None) or x.dtype
    out = NF4Linear.apply(x.to(compute), weight, qs)
    if self.bias is not None:
        out = out + self.bias.to(out.dtype)
    return out.to(x.dtype)


def enable_fast_nf4(model) -> int:
    """The one-kernel dequantization on every bitsandbytes 4-bit linear: the ones LoRA does not wrap,
    and the base layers of those it does (reached only where PEFT's own forward runs)."""
    import bitsandbytes as bnb

    n = 0
    for mod in model.modules():
        if type(mod) is bnb.nn.Linear4bit and "forward" not in mod.__dict__:
            mod.forward = types.MethodType(_fast_nf4_forward, mod)
            n += 1
    return n


def disable_fast_lora(model) -> int:
    """Back to PEFT's and bitsandbytes' own forwards; returns how many LoRA layers were switched back."""
    n = 0
    for mod in model.modules():
        fn = getattr(mod.__dict__.get("forward"), "__func__", None)
        if fn is _fast_lora_forward or fn is _fast_nf4_forward:
            del mod.forward
            n += fn is _fast_lora_forward
    return n


# ------------------------------------------------------------------ selective recompute
def decoder_layers(model) -> list:
    """The modules transformers checkpoints one by one (its GradientCheckpointingLayer), in order."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_recompute_layers(model, n: int) -> int:
    """Keep gradient checkpointing on the first n decoder layers only; the others save their
    activations (faster, more memory). Returns how many are checkpointed."""
    layers = decoder_layers(model)
    if not layers:
        raise ValueError("train.recompute_layers: this model has no per-layer gradient checkpointing")
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < n
    return min(n, len(layers))


# ------------------------------------------------------------------- activation offload
class _Offloaded:
    __slots__ = ("owner", "idx", "buf", "device", "d2h", "gpu", "h2d", "__weakref__")

    def __init__(self, owner, idx, buf, device, d2h):
        self.owner, self.idx, self.buf, self.device, self.d2h = owner, idx, buf, device, d2h
        self.gpu = self.h2d = None

    def prefetch(self) -> None:
        if self.gpu is not None:
            return
        stream = self.owner.h2d_stream
        with torch.cuda.stream(stream):
            stream.wait_event(self.d2h)
            self.gpu = self.buf.to(self.device, non_blocking=True)
            self.h2d = stream.record_event()


class ActivationOffload:
    """saved_tensors_hooks around the model's forward: large CUDA tensors saved for the backward
    outside any checkpointed region (with gradient checkpointing: each layer's input, plus the final
    norm's and the loss's) are copied to pinned CPU memory on a side stream, and copied back on
    another one, the next one ahead (the backward visits layers in reverse), so the copies overlap
    compute. Inside a checkpointed layer torch's own hooks take precedence (nothing is saved there)."""

    def __init__(self, min_bytes: int = 1 << 20, max_ahead: int = 3):
        self.min_bytes = min_bytes
        self.d2h_stream = torch.cuda.Stream()
        self.h2d_stream = torch.cuda.Stream()
        self.entries: list[weakref.ref] = []
        # The host may run at most this many offloaded tensors ahead of the GPU: memory a copy still
        # reads (or a prefetched tensor the backward has not reached) is not reusable, and an
        # unbounded lead grew reserved memory from 19.5 to 22.8 GiB on Mistral-Small-24B at batch 8.
        self.max_ahead = max_ahead
        self._ahead: collections.deque = collections.deque()
        self.bytes_offloaded = 0  # of the last forward, for tests and the bench
        self._ctx = None

    @classmethod
    def install(cls, model, min_bytes: int = 1 << 20) -> ActivationOffload:
        self = cls(min_bytes)
        model.register_forward_pre_hook(lambda mod, args: self._enter())
        model.register_forward_hook(lambda mod, args, out: self._exit(), always_call=True)
        model._d2a_offload = self
        return self

    def _enter(self) -> None:
        if self._ctx is None and torch.is_grad_enabled() and torch.cuda.is_available():
            self.entries, self.bytes_offloaded = [], 0
            self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
            self._ctx.__enter__()

    def _exit(self) -> None:
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(None, None, None)

    def pack(self, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        if (not t.is_cuda or nbytes < self.min_bytes or isinstance(t, torch.nn.Parameter)
                or not t.is_contiguous() or t.requires_grad and t.is_leaf):
            return t
        cur = torch.cuda.current_stream(t.device)
        self.d2h_stream.wait_stream(cur)
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        with torch.cuda.stream(self.d2h_stream):
            buf.copy_(t, non_blocking=True)
            t.record_stream(self.d2h_stream)  # its memory is not reused before the copy has read it
            ev = self.d2h_stream.record_event()
        e = _Offloaded(self, len(self.entries), buf, t.device, ev)
        self.entries.append(weakref.ref(e))
        self.bytes_offloaded += nbytes
        self._bound(cur)
        return e

    def _bound(self, stream) -> None:
        """Mark where the GPU's compute stream is now; wait (host side) until it has passed the mark
        ``max_ahead`` offloads back. The GPU is the bottleneck here (recompute), so this costs nothing."""
        self._ahead.append(stream.record_event())
        while len(self._ahead) > self.max_ahead:
            self._ahead.popleft().synchronize()

    def unpack(self, e):
        if isinstance(e, torch.Tensor):
            return e
        e.prefetch()  # no-op when the previous unpack already started it
        for j in range(e.idx - 1, -1, -1):  # the next one the backward will want
            prev = self.entries[j]() if j < len(self.entries) else None
            if prev is not None:
                prev.prefetch()
                break
        cur = torch.cuda.current_stream(e.device)
        cur.wait_event(e.h2d)
        t, e.gpu = e.gpu, None
        t.record_stream(cur)
        self._bound(cur)
        return t
