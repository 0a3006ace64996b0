"""Two Triton kernels for the fast QLoRA path (issue 6), each with a plain-torch fallback.

A profile of the speed point on an H200 (benchmarks/BENCH_NOTES.md) put the GEMMs at 92 % of the
measured bf16 rate; of what is left, two pieces are ours to shrink:

- **NF4 dequantization** (``dequantize_nf4``): bitsandbytes runs two kernels and a float add per
  weight (the nested absmax, its offset, then the 4-bit values) and reaches ~1.9 TB/s. One kernel
  here reads the packed bytes and the 8-bit absmax and writes the bf16 weight, bit for bit what
  ``bitsandbytes.functional.dequantize_4bit`` returns (float32 products rounded once, no FMA).
- **LoRA dropout** (``dropout_keep``): ``x * bernoulli`` is a random-number kernel writing a mask
  and a multiply reading it, for each of q, k and v, in the forward and again in the backward. One
  kernel here draws the mask from Philox (seed, element index) and applies it in the same pass, so
  the backward regenerates exactly the forward's mask without storing it. Each 32-bit Philox word
  gives two elements 16 bits each: the drop probability is p rounded to a multiple of 1/65536.

Both run where Triton and a CUDA tensor are present; ``TRITON_INTERPRET=1`` runs them on the CPU
(the tests do). Elsewhere the callers keep their torch code.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch fallbacks run
    triton = tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _on(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (a model split over GPUs)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def available(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on this tensor here."""
    return triton is not None and (t.is_cuda or INTERPRET)


if triton is not None:

    @triton.jit
    def _nf4_dequant_kernel(w_ptr, absq_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr, out_ptr, n_bytes,
                            QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, NESTED: tl.constexpr,
                            BF16_BITS: tl.constexpr, ROWS: tl.constexpr):
        # a tile of ROWS quantization blocks, QBLOCK // 2 bytes each: one absmax per row, not per byte
        HALF: tl.constexpr = QBLOCK // 2
        blk = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # quantization block index
        offs = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]  # byte index: elements 2i (high nibble), 2i+1
        m = offs < n_bytes
        rm = blk * HALF < n_bytes
        b = tl.load(w_ptr + offs, mask=m, other=0).to(tl.int32)
        if NESTED:  # absmax = code2[q] * absmax2[blk // QBLOCK2] + offset, in float32 as bnb rounds it
            q = tl.load(absq_ptr + blk, mask=rm, other=0).to(tl.int32)
            am = tl.load(code2_ptr + q, mask=rm, other=0.0) * tl.load(absmax2_ptr + blk // QBLOCK2, mask=rm, other=0.0)
            am = am + tl.load(offset_ptr)
        else:
            am = tl.load(absq_ptr + blk, mask=rm, other=0.0)
        hi = tl.load(code_ptr + (b >> 4)) * am[:, None]
        lo = tl.load(code_ptr + (b & 15)) * am[:, None]
        out = tl.interleave(hi, lo)  # (ROWS, QBLOCK): element 2i from byte i's high nibble
        if BF16_BITS:  # float32 -> bf16, round to nearest even, in integers (out_ptr is an int16 view)
            bits = out.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            out = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded).to(tl.int16)  # NaN stays NaN
        else:
            out = out.to(out_ptr.dtype.element_ty)
        o = blk[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
        tl.store(out_ptr + o, out, mask=o < 2 * n_bytes)

    @triton.jit
    def _dropout_keep_kernel(x_ptr, out_ptr, n, seed, thresh, BLOCK: tl.constexpr):
        # one Philox call (four 32-bit words) covers 8 consecutive elements, 16 bits each
        pid = tl.program_id(0)
        ctr = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
        r0, r1, r2, r3 = tl.randint4x(seed, ctr)
        r0, r1 = r0.to(tl.uint32, bitcast=True), r1.to(tl.uint32, bitcast=True)
        r2, r3 = r2.to(tl.uint32, bitcast=True), r3.to(tl.uint32, bitcast=True)
        lo = tl.join(tl.join(r0 & 0xFFFF, r0 >> 16), tl.join(r1 & 0xFFFF, r1 >> 16))
        hi = tl.join(tl.join(r2 & 0xFFFF, r2 >> 16), tl.join(r3 & 0xFFFF, r3 >> 16))
        r = tl.reshape(tl.join(lo, hi), (BLOCK,))  # element 8c + k takes the k-th 16-bit piece of call c
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(x_ptr + offs, mask=m, other=0.0)
        tl.store(out_ptr + offs, tl.where(r >= thresh, x, 0.0), mask=m)


# ------------------------------------------------------------------------------ NF4
def dequant_supported(weight: torch.Tensor, qs) -> bool:
    """A bitsandbytes 4-bit weight whose layout the kernel reads: packed bytes (uint8, or another
    storage dtype as FSDP-QLoRA uses), NF4 or FP4 code, a 16/32-bit target, nested or float32 absmax."""
    if not available(weight) or weight.is_floating_point() and weight.requires_grad or not weight.is_contiguous():
        return False
    if getattr(qs, "quant_type", None) not in ("nf4", "fp4") or qs.dtype not in (torch.bfloat16, torch.float16,
                                                                                 torch.float32):
        return False
    if qs.blocksize % 2 or getattr(qs, "packing_format_for_cpu", False):
        return False
    if qs.nested:
        return qs.absmax.dtype == torch.uint8 and qs.state2.absmax.dtype == torch.float32
    return qs.absmax.dtype == torch.float32


def _dequant_args(weight: torch.Tensor, qs) -> tuple:
    """The kernel's tensor arguments, made once per quant state (no per-call copies, and no host sync:
    the nested offset stays a device tensor the kernel loads). Remade when the state's tensors are
    replaced (``QuantState.to`` and reloads swap them on the same object)."""
    nested = qs.state2 if qs.nested else None
    source = (weight.device, qs.absmax, qs.code, nested, nested and nested.absmax, nested and nested.code, qs.offset)
    cached = qs.__dict__.get("_d2a_dequant")
    if cached is not None and cached[0][0] == source[0] and all(a is b for a, b in zip(cached[0][1:], source[1:])):
        return cached[1]
    code = qs.code.to(weight.device, torch.float32)
    if qs.nested:
        args = (qs.absmax, qs.state2.code.to(weight.device, torch.float32), qs.state2.absmax,
                torch.as_tensor(qs.offset, dtype=torch.float32, device=weight.device).reshape(1), code,
                qs.state2.blocksize)
    else:  # the nested-only arguments are not read
        args = (qs.absmax, code, qs.absmax, qs.absmax, code, 1)
    qs._d2a_dequant = (source, args)
    return args


def dequantize_nf4(weight: torch.Tensor, qs, rows: int = 64) -> torch.Tensor:
    """The (out, in) weight of a bitsandbytes 4-bit linear in ``qs.dtype``, equal bit for bit to
    ``bitsandbytes.functional.dequantize_4bit``; falls back to it where the kernel does not apply."""
    if not dequant_supported(weight, qs):
        import bitsandbytes.functional as F

        return F.dequantize_4bit(weight.view(-1, 1), qs)
    weight = weight.view(-1).view(torch.uint8)  # quant_storage bfloat16 etc.: the same bytes
    n_bytes = weight.numel()
    out = torch.empty(qs.shape, dtype=qs.dtype, device=weight.device)
    if out.numel() not in (2 * n_bytes, 2 * n_bytes - 1):
        raise ValueError(f"4-bit weight of {n_bytes} bytes does not hold a {tuple(qs.shape)} tensor")
    absq, code2, absmax2, offset, code, qb2 = _dequant_args(weight, qs)
    # an odd element count: the last byte holds one value, so write into a buffer one longer
    buf = out if out.numel() == 2 * n_bytes else torch.empty(2 * n_bytes, dtype=qs.dtype, device=weight.device)
    grid = (triton.cdiv(triton.cdiv(n_bytes, qs.blocksize // 2), rows),)
    bf16 = qs.dtype == torch.bfloat16  # rounded in integers: one rule on the GPU and in the interpreter
    # enable_fp_fusion=False: a fused multiply-add would round code2*absmax2+offset once, bnb rounds twice
    with _on(weight):
        _nf4_dequant_kernel[grid](weight, absq, code2, absmax2, offset, code, buf.view(torch.int16) if bf16 else buf,
                                  n_bytes, QBLOCK=qs.blocksize, QBLOCK2=qb2, NESTED=bool(qs.nested),
                                  BF16_BITS=bf16, ROWS=rows, enable_fp_fusion=False)
    if buf is not out:
        out.view(-1).copy_(buf[: out.numel()])
    return out


# --------------------------------------------------------------------------- dropout
def keep_threshold(p: float) -> int:
    """The 16-bit threshold: an element is kept when its random 16 bits are >= this."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return round(p * 65536)


def dropout_keep(x: torch.Tensor, p: float, seed: int, out: torch.Tensor | None = None,
                 block: int = 4096) -> torch.Tensor:
    """x with the elements dropped by dropout(p) set to 0 (not rescaled: callers fold 1/(1-p) into a
    smaller tensor). The mask is a function of (seed, element index), so the same call on a tensor of
    the same shape drops the same elements; ``out=x`` works in place. Needs ``available(x)``."""
    if not x.is_contiguous():
        raise ValueError("dropout_keep: x must be contiguous (the mask follows the element index)")
    n = x.numel()
    if n >= 2**31 - block:
        raise ValueError(f"dropout_keep: {n} elements exceed the kernel's 32-bit Philox counter")
    out = torch.empty_like(x) if out is None else out
    with _on(x):
        _dropout_keep_kernel[(triton.cdiv(n, block),)](x, out, n, seed & 0x7FFFFFFF, keep_threshold(p), BLOCK=block)
    return out
