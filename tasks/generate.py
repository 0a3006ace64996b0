"""Inference with a trained adapter: the base is loaded with exactly the quantization the run
recorded (a mismatch is refused unless explicitly overridden), the adapter on top, and prompts go
through the model's chat template.

    python -m tasks.generate --run data/demo/runs/<run_id> --prompt "A quick lentil soup?"
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from prefect import task

from tasks.config import GenerateConfig, QuantizationConfig, load_config

log = logging.getLogger(__name__)


def load_run_base(run_dir: Path, quantization: QuantizationConfig | None = None,
                  allow_quantization_mismatch: bool = False, device_map: Any = None):
    """(base model, tokenizer) loaded exactly as the run trained it. ``quantization`` is what the
    caller asks for; it must equal what training recorded in ``adapter/quantization.json``."""
    from tasks.model import check_quantization, load_base, load_tokenizer

    adapter = Path(run_dir) / "adapter"
    rec_path = adapter / "quantization.json"
    if not rec_path.is_file():
        raise FileNotFoundError(f"{rec_path} not found: is {run_dir} a finished training run?")
    record = json.loads(rec_path.read_text())
    model_cfg = load_config(Path(run_dir) / "config.yaml").model
    if quantization is not None:
        check_quantization(record, quantization, allow_quantization_mismatch)
    else:
        quantization = QuantizationConfig(**record["quantization"])
    model_cfg = model_cfg.model_copy(update={"quantization": quantization})
    tok = load_tokenizer(str(adapter), model_cfg)
    base = load_base(record["base_path"], model_cfg, device_map=device_map)
    base.eval()
    return base, tok


def attach_adapter(base, run_dir: Path):
    from peft import PeftModel

    from tasks.model import disable_cpu_inference_repack

    model = PeftModel.from_pretrained(base, str(Path(run_dir) / "adapter"))
    disable_cpu_inference_repack(model)
    model.eval()
    return model


def load_for_inference(run_dir: Path, quantization: QuantizationConfig | None = None,
                       allow_quantization_mismatch: bool = False, device_map: Any = None):
    """(model with adapter, tokenizer)."""
    base, tok = load_run_base(run_dir, quantization, allow_quantization_mismatch, device_map)
    return attach_adapter(base, run_dir), tok


def chat(model, tok, prompt: str, gen: GenerateConfig, max_new_tokens: int | None = None) -> str:
    """One answer to one user turn, through the chat template."""
    import torch

    if not prompt.strip():
        raise ValueError("empty prompt")
    msgs = [{"role": "user", "content": prompt}]
    if getattr(tok, "chat_template", None):
        enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:
        enc = tok(prompt, return_tensors="pt")
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    torch.manual_seed(gen.seed)
    sample = gen.temperature > 0
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens or gen.max_new_tokens, do_sample=sample,
                             temperature=gen.temperature if sample else None, top_p=gen.top_p if sample else None,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run_generate(run_dir: Path, prompt: str, gen: GenerateConfig | None = None,
                 allow_quantization_mismatch: bool = False, quantization: QuantizationConfig | None = None) -> str:
    cfg = load_config(Path(run_dir) / "config.yaml")
    model, tok = load_for_inference(run_dir, quantization or cfg.model.quantization, allow_quantization_mismatch)
    return chat(model, tok, prompt, gen or cfg.generate)


@task(name="generate")
def generate(run_dir: str, prompt: str) -> str:
    return run_generate(Path(run_dir), prompt)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Answer a prompt with a trained adapter.")
    ap.add_argument("--run", required=True, type=Path, help="runs/<run_id> directory of a finished run")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--quant", action="append", default=[], metavar="KEY=VALUE",
                    help="load the base with this quantization setting instead of the recorded one "
                         "(refused unless --allow-quantization-mismatch), e.g. --quant compute_dtype=float32")
    ap.add_argument("--allow-quantization-mismatch", action="store_true")
    a = ap.parse_args(argv)
    cfg = load_config(a.run / "config.yaml")
    quant = None
    if a.quant:
        import yaml

        upd = dict(q.split("=", 1) for q in a.quant)
        quant = QuantizationConfig(**{**cfg.model.quantization.model_dump(), **{k: yaml.safe_load(v) for k, v in upd.items()}})
    gen = cfg.generate.model_copy(update={k: v for k, v in {"max_new_tokens": a.max_new_tokens,
                                                            "temperature": a.temperature}.items() if v is not None})
    print(run_generate(a.run, a.prompt, gen, a.allow_quantization_mismatch, quant))


if __name__ == "__main__":
    main()
