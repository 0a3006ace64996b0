"""Inference with a trained adapter: the base is loaded with exactly the quantization the run
recorded (a mismatch is refused unless explicitly overridden), the adapter on top, and prompts go
through the model's chat template.

    python -m tasks.adapter.generate --run R --prompt "A quick lentil soup?"            # = ask
    python -m tasks.adapter.generate chat    --run R                                     # streamed, multi-turn, /exit
    python -m tasks.adapter.generate batch   --run R --prompts p.jsonl --out a.jsonl     # {"id":..,"prompt":..} per line
    python -m tasks.adapter.generate compare --run R --prompts p.jsonl --out cmp.md      # base vs adapter, Markdown + JSON

Sampling settings come from the run config's ``generate`` section (temperature, top_p,
max_new_tokens, seed); ``--temperature`` etc. override them. The seed is reset before every answer,
so an answer does not depend on what was asked before it (in a batch file or a comparison).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tasks.core._prefect import task
from tasks.core.config import ConfigError, GenerateConfig, QuantizationConfig, load_config

log = logging.getLogger(__name__)

EXIT_COMMAND = "/exit"
_AUTO = "auto-detect"


# ----------------------------------------------------------------------------- loading
def pick_device_map(device: str = "auto") -> Any:
    """``device_map`` for from_pretrained: the GPU(s) when CUDA is there, else the CPU (None)."""
    import torch

    if device == "cpu":
        return None
    if device in ("cuda", "auto") and torch.cuda.is_available():
        return "auto"  # spreads a large base over every visible GPU; one GPU gets everything
    if device == "cuda":
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    return None


def read_quantization_record(run_dir: Path) -> dict[str, Any]:
    rec_path = Path(run_dir) / "adapter" / "quantization.json"
    if not rec_path.is_file():
        raise FileNotFoundError(f"{rec_path} not found: is {run_dir} a finished training run?")
    return json.loads(rec_path.read_text())


def check_base_present(base_path: str, rec_file: Path) -> None:
    """A recorded local base that has gone missing would otherwise be looked up on the hub and
    fail with a confusing network error."""
    looks_local = os.path.isabs(base_path) or base_path.startswith((".", "~"))
    if looks_local and not Path(base_path).expanduser().is_dir():
        raise FileNotFoundError(
            f"base model {base_path} (recorded as base_path in {rec_file}) does not exist; "
            "re-create it (run the train stage's model conversion, e.g. `d2a stage train`) or restore it")


def load_run_base(run_dir: Path, quantization: QuantizationConfig | None = None,
                  allow_quantization_mismatch: bool = False, device_map: Any = _AUTO, revision: str | None = None):
    """(base model, tokenizer) loaded exactly as the run trained it. ``quantization`` is what the
    caller asks for; it must equal what training recorded in ``adapter/quantization.json``. The base
    on disk must be the revision the adapter was trained on, and ``revision`` (the caller's, if any) too."""
    from tasks.core.model import check_base_revision, check_quantization, load_base, load_tokenizer, revision_on_disk

    adapter = Path(run_dir) / "adapter"
    record = read_quantization_record(run_dir)
    model_cfg = load_config(Path(run_dir) / "config.yaml").model
    if quantization is not None:
        check_quantization(record, quantization, allow_quantization_mismatch)
    else:
        quantization = QuantizationConfig(**record["quantization"])
    check_base_present(record["base_path"], adapter / "quantization.json")
    what = f"the adapter of run {Path(run_dir).name}"
    check_base_revision(record.get("base_revision"), revision_on_disk(record["base_path"], model_cfg), what)
    check_base_revision(record.get("base_revision"), revision, what)
    model_cfg = model_cfg.model_copy(update={"quantization": quantization})
    tok = load_tokenizer(str(adapter), model_cfg)
    base = load_base(record["base_path"], model_cfg, device_map=pick_device_map() if device_map == _AUTO else device_map)
    base.eval()
    return base, tok


def check_adapter_fits(base, adapter_dir: Path) -> None:
    """Refuse an adapter made for another architecture with a message naming the tensor, before
    PEFT fails deep inside with a bare size mismatch."""
    from safetensors import safe_open

    f = Path(adapter_dir) / "adapter_model.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found (the adapter must be saved as safetensors)")
    modules = dict(base.named_modules())
    with safe_open(str(f), framework="pt") as st:
        for key in st.keys():
            m = re.match(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)\.weight$", key)
            if not m:
                continue
            name, kind = m.groups()
            mod = modules.get(name)
            if mod is None:
                raise ValueError(f"{f}: tensor {key} targets module {name!r}, which this base does not have: "
                                 "the adapter was trained for another architecture")
            shape = tuple(st.get_slice(key).get_shape())
            dim, want = (shape[1], getattr(mod, "in_features", None)) if kind == "lora_A" else \
                        (shape[0], getattr(mod, "out_features", None))
            if want is not None and dim != want:
                raise ValueError(f"{f}: tensor {key} has shape {list(shape)}, but the base's {name} has "
                                 f"{'in' if kind == 'lora_A' else 'out'}_features={want}: "
                                 "the adapter was trained for another model")


def attach_adapter(base, run_dir: Path):
    from peft import PeftModel

    from tasks.core.model import disable_cpu_inference_repack

    adapter = Path(run_dir) / "adapter"
    check_adapter_fits(base, adapter)
    model = PeftModel.from_pretrained(base, str(adapter))
    disable_cpu_inference_repack(model)
    model.eval()
    return model


def load_for_inference(run_dir: Path, quantization: QuantizationConfig | None = None,
                       allow_quantization_mismatch: bool = False, device_map: Any = _AUTO,
                       revision: str | None = None):
    """(model with adapter, tokenizer)."""
    base, tok = load_run_base(run_dir, quantization, allow_quantization_mismatch, device_map, revision)
    return attach_adapter(base, run_dir), tok


# -------------------------------------------------------------------------- generation
def gen_settings(base: GenerateConfig, **overrides: Any) -> GenerateConfig:
    """The config's sampling settings with the non-None overrides applied, validated."""
    return GenerateConfig.model_validate({**base.model_dump(), **{k: v for k, v in overrides.items() if v is not None}})


def encode_messages(tok, messages: list[dict[str, str]]) -> dict[str, Any]:
    if getattr(tok, "chat_template", None):
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return dict(enc)
    # no template: a plain transcript, so multi-turn history still reaches the model
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return dict(tok(text, return_tensors="pt"))


def _input_device(model):
    return model.get_input_embeddings().weight.device


def context_limit(model) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def reply(model, tok, messages: list[dict[str, str]], gen: GenerateConfig, streamer=None) -> str:
    """The assistant's answer to a conversation (the last message is the user's turn)."""
    import torch

    if not messages or not str(messages[-1].get("content", "")).strip():
        raise ValueError("empty prompt: there is nothing to answer")
    enc = encode_messages(tok, messages)
    n_in = enc["input_ids"].shape[1]
    limit = context_limit(model)
    if limit and n_in + 1 > limit:
        raise ValueError(f"prompt is {n_in} tokens; the model's context is {limit} tokens")
    device = _input_device(model)
    enc = {k: v.to(device) for k, v in enc.items()}
    torch.manual_seed(gen.seed)
    sample = gen.temperature > 0
    max_new = min(gen.max_new_tokens, limit - n_in) if limit else gen.max_new_tokens
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new, do_sample=sample,
                             temperature=gen.temperature if sample else None, top_p=gen.top_p if sample else None,
                             pad_token_id=tok.pad_token_id, streamer=streamer)
    return tok.decode(out[0, n_in:], skip_special_tokens=True).strip()


def chat(model, tok, prompt: str, gen: GenerateConfig, max_new_tokens: int | None = None) -> str:
    """One answer to one user turn, through the chat template."""
    if max_new_tokens is not None:
        gen = gen_settings(gen, max_new_tokens=max_new_tokens)
    return reply(model, tok, [{"role": "user", "content": prompt}], gen)


def run_generate(run_dir: Path, prompt: str, gen: GenerateConfig | None = None,
                 allow_quantization_mismatch: bool = False, quantization: QuantizationConfig | None = None,
                 revision: str | None = None) -> str:
    if not prompt.strip():  # before minutes of model loading
        raise ValueError("empty prompt: there is nothing to answer")
    cfg = load_config(Path(run_dir) / "config.yaml")
    model, tok = load_for_inference(run_dir, quantization or cfg.model.quantization, allow_quantization_mismatch,
                                    revision=revision)
    return chat(model, tok, prompt, gen or cfg.generate)


# ------------------------------------------------------------------------ interactive chat
def make_streamer(tok, out: IO[str]):
    """A TextStreamer that writes to ``out`` (stdout by default) as tokens arrive."""
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return _Streamer(tok, skip_prompt=True, skip_special_tokens=True)


def chat_session(model, tok, gen: GenerateConfig, read: Callable[[str], str] = input,
                 out: IO[str] | None = None, system: str | None = None) -> list[dict[str, str]]:
    """Multi-turn chat: every turn sees the whole history through the chat template; answers stream
    as they are generated. ``/exit`` (or end of input) quits, ``/reset`` forgets the history.
    Returns the conversation."""
    out = out or sys.stdout
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    streamer = make_streamer(tok, out)
    out.write(f"chat with the adapter; {EXIT_COMMAND} to quit, /reset to start over\n")
    while True:
        try:
            text = read("you> ")
        except EOFError:
            break
        if text.strip() == EXIT_COMMAND:
            break
        if text.strip() == "/reset":
            history = history[:1] if system else []
            continue
        if not text.strip():
            out.write("(empty prompt: type something, or /exit to quit)\n")
            continue
        history.append({"role": "user", "content": text})
        out.write("model> ")
        try:
            answer = reply(model, tok, history, gen, streamer=streamer)
        except ValueError as e:  # e.g. the history outgrew the context: say so and keep the session
            history.pop()
            out.write(f"\n(error: {e}; /reset to start over)\n")
            continue
        history.append({"role": "assistant", "content": answer})
    return history


# ------------------------------------------------------------------------ prompt files
@dataclass
class PromptLine:
    line: int
    id: Any
    prompt: str


@dataclass
class Reject:
    line: int
    reason: str
    text: str

    def as_dict(self, source: Path) -> dict[str, Any]:
        return {"file": str(source), "line": self.line, "reason": self.reason, "text": self.text[:500]}


def read_prompts(path: Path) -> tuple[list[PromptLine], list[Reject]]:
    """Parse a JSONL prompts file: one ``{"id": ..., "prompt": "..."}`` object per line. Bad lines
    (not UTF-8, not JSON, not an object, missing/empty fields, duplicate ids) become rejects that
    name the line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} not found")
    good: list[PromptLine] = []
    bad: list[Reject] = []
    seen: dict[str, int] = {}
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                bad.append(Reject(n, f"not valid UTF-8 ({e.reason} at byte {e.start})", raw.decode("utf-8", "replace").strip()))
                continue
            if not text:
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                bad.append(Reject(n, f"not valid JSON: {e.msg} (column {e.colno})", text))
                continue
            if not isinstance(obj, dict):
                bad.append(Reject(n, f"expected a JSON object, got {type(obj).__name__}", text))
                continue
            if "id" not in obj or obj["id"] in (None, ""):
                bad.append(Reject(n, "missing field 'id'", text))
                continue
            if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
                bad.append(Reject(n, f"field 'id' must be a string or an integer, got {type(obj['id']).__name__}", text))
                continue
            prompt = obj.get("prompt")
            if not isinstance(prompt, str):
                bad.append(Reject(n, "missing field 'prompt'" if prompt is None else
                                  f"field 'prompt' must be a string, got {type(prompt).__name__}", text))
                continue
            if not prompt.strip():
                bad.append(Reject(n, "empty prompt", text))
                continue
            key = json.dumps(obj["id"])
            if key in seen:
                bad.append(Reject(n, f"duplicate id {obj['id']!r} (first on line {seen[key]})", text))
                continue
            seen[key] = n
            good.append(PromptLine(n, obj["id"], prompt))
    return good, bad


def _write_jsonl_atomic(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rejects_path(out: Path) -> Path:
    return out.with_name(out.name + ".rejects.jsonl")


def run_batch(model, tok, prompts_path: Path, out_path: Path, gen: GenerateConfig,
              progress: bool = True) -> dict[str, Any]:
    """Answer every good line of ``prompts_path`` into ``out_path`` (JSONL: id, line, prompt,
    answer). Bad lines, and prompts the model cannot answer, go to ``<out>.rejects.jsonl`` with
    their line number; the rest is answered. Answers are written to ``<out>.partial`` and renamed
    only when the batch is complete, so an interrupted batch never looks finished."""
    from tqdm.auto import tqdm

    prompts_path, out_path = Path(prompts_path), Path(out_path)
    items, rejects = read_prompts(prompts_path)
    for r in rejects:
        log.warning("%s:%d: %s: skipped", prompts_path, r.line, r.reason)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    t0 = time.time()
    answered = 0
    with open(partial, "w", encoding="utf-8") as f:
        for item in tqdm(items, desc="batch", unit="prompt", disable=not progress, file=sys.stderr):
            try:
                answer = reply(model, tok, [{"role": "user", "content": item.prompt}], gen)
            except (ValueError, RuntimeError) as e:  # one bad prompt must not sink the batch
                rejects.append(Reject(item.line, f"generation failed: {e}", item.prompt))
                log.warning("%s:%d: generation failed: %s", prompts_path, item.line, e)
                continue
            f.write(json.dumps({"id": item.id, "line": item.line, "prompt": item.prompt, "answer": answer},
                               ensure_ascii=False) + "\n")
            f.flush()
            answered += 1
        os.fsync(f.fileno())
    rej = rejects_path(out_path)
    if rejects:  # the rejects are in place before the answers file appears complete
        _write_jsonl_atomic(rej, (r.as_dict(prompts_path) for r in sorted(rejects, key=lambda r: r.line)))
    elif rej.exists():
        rej.unlink()  # a stale list from an earlier run would misreport this one
    os.replace(partial, out_path)
    summary = {"prompts_file": str(prompts_path), "out": str(out_path), "answered": answered,
               "rejected": len(rejects), "rejects_file": str(rej) if rejects else None,
               "rejects": [r.as_dict(prompts_path) for r in sorted(rejects, key=lambda r: r.line)],
               "wall_s": round(time.time() - t0, 1), "generate": gen.model_dump()}
    return summary


# ------------------------------------------------------------------------------- compare
def compare_answers(run_dir: Path, prompts: list[str], gen: GenerateConfig,
                    quantization: QuantizationConfig | None = None,
                    allow_quantization_mismatch: bool = False, revision: str | None = None) -> dict[str, Any]:
    """The same prompts answered by the base and by base+adapter. The base answers come first,
    from the untouched base: a bias="all" adapter changes base biases even when disabled."""
    prompts = [p for p in prompts]
    empty = [i + 1 for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise ValueError(f"empty prompt(s) at position {empty}")
    if not prompts:
        raise ValueError("no prompts to compare")
    record = read_quantization_record(run_dir)
    t0 = time.time()
    model, tok = load_run_base(run_dir, quantization, allow_quantization_mismatch, revision=revision)
    base = [chat(model, tok, p, gen) for p in prompts]
    model = attach_adapter(model, run_dir)
    adapted = [chat(model, tok, p, gen) for p in prompts]
    return {
        "run_dir": str(run_dir), "base_model": record["base_model"], "base_path": record["base_path"],
        "quantization": record["quantization"], "generate": gen.model_dump(),
        "rows": [{"prompt": p, "base": b, "adapter": a, "same": a == b} for p, b, a in zip(prompts, base, adapted)],
        "wall_s": round(time.time() - t0, 1),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or "*(empty)*"


def compare_markdown(result: dict[str, Any]) -> str:
    """A readable side-by-side report; also what the Prefect artifact shows."""
    q = result["quantization"]
    g = result["generate"]
    rows = result["rows"]
    n_diff = sum(not r["same"] for r in rows)
    lines = [
        f"# Base vs adapter: {Path(result['run_dir']).name}",
        "",
        f"- base: `{result['base_model']}` ({'4-bit ' + q['quant_type'] if q.get('load_in_4bit') else 'unquantized'}, "
        f"compute {q['compute_dtype']}, the quantization training recorded)",
        f"- adapter: `{result['run_dir']}/adapter`",
        f"- sampling: temperature {g['temperature']}, top_p {g['top_p']}, max_new_tokens {g['max_new_tokens']}, seed {g['seed']}",
        f"- {len(rows)} prompt(s); the adapter's answer differs on {n_diff}",
        "",
        "| # | prompt | base | adapter |",
        "|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {_cell(r['prompt'])} | {_cell(r['base'])} | {_cell(r['adapter'])}"
                     f"{' *(same as base)*' if r['same'] else ''} |")
    return "\n".join(lines) + "\n"


def run_compare(run_dir: Path, prompts: list[str], out_md: Path, gen: GenerateConfig | None = None,
                quantization: QuantizationConfig | None = None,
                allow_quantization_mismatch: bool = False, revision: str | None = None) -> tuple[str, dict[str, Any]]:
    """Write ``out_md`` (Markdown) and the same data as ``<out_md minus .md>.json``."""
    gen = gen or load_config(Path(run_dir) / "config.yaml").generate
    result = compare_answers(Path(run_dir), prompts, gen, quantization, allow_quantization_mismatch, revision)
    md = compare_markdown(result)
    out_md = Path(out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_md.with_name(out_md.name + ".partial")
    tmp.write_text(md, encoding="utf-8")
    os.replace(tmp, out_md)
    from tasks.core.manifest import write_json_atomic

    write_json_atomic(out_md.with_suffix(".json"), result)
    return md, result


# --------------------------------------------------------------------------- Prefect tasks
@task(name="generate")
def generate(run_dir: str, prompt: str) -> str:
    return run_generate(Path(run_dir), prompt)


@task(name="compare")
def compare(run_dir: str, prompts: list[str], out_md: str | None = None) -> str:
    """Base vs adapter on ``prompts``, written beside the run and published as a Markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    out = Path(out_md) if out_md else Path(run_dir) / "compare.md"
    md, _ = run_compare(Path(run_dir), prompts, out)
    key = re.sub(r"[^a-z0-9-]+", "-", f"compare-{Path(run_dir).name}".lower()).strip("-")
    create_markdown_artifact(key=key, markdown=md, description=f"base vs adapter answers for {run_dir}")
    return md


@task(name="batch-generate")
def batch_generate(run_dir: str, prompts_path: str, out_path: str) -> dict:
    cfg = load_config(Path(run_dir) / "config.yaml")
    model, tok = load_for_inference(Path(run_dir), cfg.model.quantization)
    return run_batch(model, tok, Path(prompts_path), Path(out_path), cfg.generate, progress=False)


# ----------------------------------------------------------------------------------- CLI
COMMANDS = ("ask", "chat", "batch", "compare")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--run", required=True, type=Path, help="runs/<run_id> directory of a finished run")
    common.add_argument("--max-new-tokens", type=int)
    common.add_argument("--temperature", type=float, help="0 = greedy")
    common.add_argument("--top-p", type=float)
    common.add_argument("--seed", type=int)
    common.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = the GPU(s) when CUDA is available, else the CPU")
    common.add_argument("--quant", action="append", default=[], metavar="KEY=VALUE",
                        help="load the base with this quantization setting instead of the recorded one "
                             "(refused unless --allow-quantization-mismatch), e.g. --quant compute_dtype=float32")
    common.add_argument("--allow-quantization-mismatch", action="store_true")
    common.add_argument("--revision", help="refuse unless the run's base is this revision (model.revision: a hub "
                                           "commit, or sha256:<hex> of the demo's GGUF file)")
    ap = argparse.ArgumentParser(prog="python -m tasks.adapter.generate",
                                 description="Use a trained adapter: ask, chat, batch, compare.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ask", parents=[common], help="answer one prompt (the default when --prompt is given)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    sub.add_parser("chat", parents=[common], help="interactive multi-turn chat, streamed; /exit to quit") \
        .add_argument("--system", help="a system message for the conversation")
    b = sub.add_parser("batch", parents=[common], help="answer a JSONL file of {id, prompt} lines")
    b.add_argument("--prompts", required=True, type=Path)
    b.add_argument("--out", required=True, type=Path)
    b.add_argument("--no-progress", action="store_true")
    c = sub.add_parser("compare", parents=[common], help="base vs adapter on the same prompts (Markdown + JSON)")
    c.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    c.add_argument("--prompts", type=Path, help="a JSONL file of {id, prompt} lines")
    c.add_argument("--out", type=Path, help="report path (default <run>/compare.md)")
    return ap


def _quantization(a, cfg) -> QuantizationConfig | None:
    if not a.quant:
        return None
    import yaml

    bad = [q for q in a.quant if "=" not in q]
    if bad:
        raise ValueError(f"--quant {bad[0]!r}: expected KEY=VALUE")
    upd = {k: yaml.safe_load(v) for k, v in (q.split("=", 1) for q in a.quant)}
    return QuantizationConfig(**{**cfg.model.quantization.model_dump(), **upd})


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["ask", *argv]  # the original form: --run R --prompt P
    a = _parser().parse_args(argv)
    try:
        _main(a)
    except (ValueError, FileNotFoundError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _main(a) -> None:
    from tasks.core.model import quiet_libraries

    quiet_libraries()
    cfg = load_config(a.run / "config.yaml")
    gen = gen_settings(cfg.generate, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                       top_p=a.top_p, seed=a.seed)
    quant = _quantization(a, cfg) or cfg.model.quantization
    device_map = pick_device_map(a.device)
    if a.cmd == "compare":
        prompts = list(a.prompt)
        if a.prompts:
            items, rejects = read_prompts(a.prompts)
            for r in rejects:
                print(f"{a.prompts}:{r.line}: {r.reason}: skipped", file=sys.stderr)
            prompts += [i.prompt for i in items]
        prompts = prompts or [cfg.evaluate.prompt]
        out = a.out or a.run / "compare.md"
        md, _ = run_compare(a.run, prompts, out, gen, quant, a.allow_quantization_mismatch, a.revision)
        print(md)
        print(f"report: {out} (+ {out.with_suffix('.json')})", file=sys.stderr)
        return
    if a.cmd == "ask" and not a.prompt.strip():
        raise ValueError("empty prompt: there is nothing to answer")
    if a.cmd == "batch":
        read_prompts(a.prompts)  # a missing file fails before the model loads
    model, tok = load_for_inference(a.run, quant, a.allow_quantization_mismatch, device_map, a.revision)
    if a.cmd == "ask":
        if a.stream:
            reply(model, tok, [{"role": "user", "content": a.prompt}], gen, streamer=make_streamer(tok, sys.stdout))
        else:
            print(chat(model, tok, a.prompt, gen))
    elif a.cmd == "chat":
        chat_session(model, tok, gen, system=a.system)
    elif a.cmd == "batch":
        s = run_batch(model, tok, a.prompts, a.out, gen, progress=not a.no_progress)
        for r in s["rejects"]:
            print(f"{r['file']}:{r['line']}: {r['reason']}: skipped", file=sys.stderr)
        print(f"{s['answered']} answered -> {s['out']}; {s['rejected']} rejected"
              + (f" -> {s['rejects_file']}" if s["rejects_file"] else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
