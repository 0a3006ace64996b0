"""Checkpoints and adapters on disk: atomic save with the data position, prune, find the latest
complete one, the FSDP adapter gather, the portable adapter config."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from tasks.core.manifest import (
    fsync_dir,
    fsync_tree,
    library_versions,
    sha256_file,
    write_json_atomic,
)

log = logging.getLogger(__name__)


_CKPT_RE = re.compile(r"^step-(\d+)$")


# ------------------------------------------------------------------------------ checkpoints
def _tensor_files(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file() and p.name != "checkpoint.json"}


def _complete_checkpoints(run_dir: Path) -> list[Path]:
    """step-N directories that were renamed into place (a .partial one is a write that never finished)."""
    found = [p for p in (run_dir / "checkpoints").glob("step-*") if _CKPT_RE.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(_CKPT_RE.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Newest checkpoint whose files all verify; a torn or corrupted one is skipped with a message."""
    for ck in reversed(_complete_checkpoints(run_dir)):
        meta = ck / "checkpoint.json"
        if not meta.is_file():
            log.warning("checkpoint %s has no checkpoint.json (torn write?): skipped", ck)
            continue
        try:
            want = json.loads(meta.read_text())["files"]
        except (json.JSONDecodeError, KeyError):
            log.warning("checkpoint %s has an unreadable checkpoint.json: skipped", ck)
            continue
        if _tensor_files(ck) != want:
            log.warning("checkpoint %s fails its sha256 check: skipped", ck)
            continue
        return ck
    return None


def prune_checkpoints(run_dir: Path, keep: int, keep_best: bool, protect: Path) -> list[Path]:
    """Keep the newest ``keep`` complete checkpoints, the best by eval loss, and ``protect`` (the one
    just written and verified); delete the other complete ones. Returns what was deleted."""
    done = [p for p in _complete_checkpoints(run_dir) if (p / "checkpoint.json").is_file()]
    metas = {}
    for p in done:
        with contextlib.suppress(json.JSONDecodeError, OSError):
            metas[p] = json.loads((p / "checkpoint.json").read_text())
    keep_set = set(done[-keep:]) | {protect}
    scored = [(m["eval_loss"], int(m["step"]), p) for p, m in metas.items()
              if isinstance(m.get("eval_loss"), (int, float)) and math.isfinite(m["eval_loss"])]
    if keep_best and scored:
        keep_set.add(min(scored, key=lambda t: (t[0], -t[1]))[2])
    gone = [p for p in done if p not in keep_set]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


class NonFiniteWeights(RuntimeError):
    pass


def weights_finite(params, acc) -> bool:
    """True when every trainable weight on every rank is finite (each rank checks its own shard)."""
    import torch

    bad = torch.tensor(0.0 if all(bool(torch.isfinite(p.detach()).all()) for p in params) else 1.0, device=acc.device)
    return acc.reduce(bad, reduction="sum").item() == 0


def save_adapter(acc, model, out_dir: Path, fsdp: bool) -> None:
    """Write the adapter in plain PEFT format (adapter_config.json + adapter_model.safetensors).

    Under FSDP every rank takes part in gathering the full state dict to rank 0, which writes the
    LoRA tensors itself: PEFT's own save finds its layers by module name, and FSDP's wrapper
    prefixes hide them from it (it would write an empty adapter)."""
    from safetensors.torch import save_file

    if not fsdp:
        if acc.is_main_process:
            acc.unwrap_model(model).save_pretrained(out_dir, safe_serialization=True)
        return
    sd = acc.get_state_dict(model)
    if not acc.is_main_process:
        return
    peft_model = acc.unwrap_model(model)
    name = peft_model.active_adapter
    bias = peft_model.peft_config[name].bias
    keep = {}
    for k, v in sd.items():
        k = k.replace("_fsdp_wrapped_module.", "")
        if ("lora_" in k and f".{name}." in k) or (bias == "all" and k.endswith(".bias")):
            keep[k.replace(f".{name}", "")] = v.detach().cpu().contiguous()
    if not any("lora_" in k for k in keep):
        raise RuntimeError(f"no LoRA weights in the gathered FSDP state dict (keys like {list(sd)[:4]})")
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.peft_config[name].save_pretrained(str(out_dir))
    save_file(keep, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})


def portable_adapter_config(adapter_dir: Path, base_model: str) -> dict[str, str]:
    """Make the saved adapter_config.json loadable elsewhere: PEFT records the local path the base
    was loaded from, others need its name; and bias "all" on a model without bias terms trained
    nothing, so say "none" (vLLM refuses any other value). Returns the configured and saved bias."""
    from safetensors import safe_open

    path = adapter_dir / "adapter_config.json"
    conf = json.loads(path.read_text())
    configured = conf.get("bias", "none")
    conf["base_model_name_or_path"] = base_model
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        only_lora = all("lora_" in k for k in f.keys())
    if configured != "none" and only_lora:
        conf["bias"] = "none"
    write_json_atomic(path, conf)
    return {"configured_bias": configured, "saved_bias": conf["bias"]}


def save_checkpoint(run_dir: Path, acc, model, opt, sched, state: dict[str, Any], tc, params,
                    fsdp: bool = False, pause_s: float = 0.0) -> Path:
    """Write checkpoints/step-N atomically: build it in step-N.partial, fsync, hash every file into
    checkpoint.json, then rename. A reader never sees a half-written step-N (a crash leaves only
    the .partial, which is ignored and cleaned up), and weights that are not finite are never written."""
    import torch

    if not weights_finite(params, acc):
        raise NonFiniteWeights(f"non-finite weights at step {state['step']}: checkpoint not written")
    ck_root = run_dir / "checkpoints"
    final = ck_root / f"step-{state['step']}"
    tmp = ck_root / f"step-{state['step']}.partial"
    rank = acc.process_index
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng-rank{rank}.pt")
    # FSDP: every rank takes part in gathering the adapter, and keeps its own optimizer shard
    save_adapter(acc, model, tmp / "adapter", fsdp)
    if fsdp:
        torch.save(opt.state_dict(), tmp / f"optimizer-rank{rank}.pt")
    if acc.is_main_process:
        if pause_s:  # test hook: a kill lands while the checkpoint is half written
            print(f"checkpoint step-{state['step']}: pausing {pause_s}s mid-write (D2A_CKPT_PAUSE_STEP)", flush=True)
            time.sleep(pause_s)
        if not fsdp:
            torch.save(opt.state_dict(), tmp / "optimizer.pt")
        write_json_atomic(tmp / "trainer_state.json", {**state, "scheduler": sched.state_dict(), "versions": library_versions()})
    acc.wait_for_everyone()
    if acc.is_main_process:
        for f in tmp.rglob("*"):  # the rename must not overtake the data on a crash
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        write_json_atomic(tmp / "checkpoint.json", {"step": state["step"], "eval_loss": state.get("eval_loss"),
                                                    "files": _tensor_files(tmp)})
        fsync_tree(tmp)  # directories too: the rename must not overtake their entries
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(ck_root)
        prune_checkpoints(run_dir, tc.keep_checkpoints, tc.keep_best, protect=final)
    acc.wait_for_everyone()
    return final
