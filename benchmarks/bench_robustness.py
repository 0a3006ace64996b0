"""Benchmark: every data stage on bad and huge input, each in its own process, with its peak memory.

    python -m benchmarks.bench_robustness --model DIR                  # full size (see defaults below)
    python -m benchmarks.bench_robustness --model DIR --lines 20000 --big-mb 5 --huge-mb 12

The input is one JSONL dataset (recipes) of ``--lines`` lines: good documents, 1% garbage lines
(malformed JSON, invalid UTF-8, a JSON array, empty text, a lone surrogate, no text field), one
``--big-mb`` MB document (kept: clean splits it into parts of ``clean.max_chars``), one ``--huge-mb``
MB row (over ``max_record_bytes``: quarantined as too_large at import, read in 1 MiB pieces), blank
lines; and a folder dataset (articles) holding an empty file beside a small good one. Stages run
import (``d2a stage scrape``'s run_scrape) -> extract -> clean -> split -> mix -> tokenize, each in a
fresh process that reports its counts and its peak RSS over the RSS it had after its imports.
``--model`` is a local model/tokenizer folder (tests use the tiny one from tests/conftest.py).

tests/test_robustness.py runs this same code at a small scale; the full size is for the record.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

STAGES = ("scrape", "extract", "clean", "split", "mix", "tokenize")
PROSE = ("Oats are a whole grain rich in beta-glucan fibre, which slows digestion. Soak them overnight, "
         "then simmer with milk, a pinch of salt and grated apple until creamy.")
WORDS = (PROSE + " lentil carrot onion cumin stock lemon pepper simmer roast bake boil whisk fold knead "
         "rest proof glaze braise sear grill steam poach blanch zest").split()
PERMISSION = {"evidence_url": "https://example.org/card", "license": "CC0-1.0", "note": "synthetic benchmark data"}
# garbage kinds, in rotation: (bytes of the line, the import reject reason it must get)
GARBAGE = (
    (b'{"id": "broken", "text": "cut off mid-', "malformed_json"),
    ('{"id": "latin1", "text": "caf\xe9 cr\xe8me br\xfbl\xe9e"}'.encode("latin-1"), "decode_error"),
    (b"[1, 2, 3]", "not_an_object"),
    (b'{"id": "blank", "text": "   "}', "empty"),
    (b'{"id": "surrogate", "text": "half a pair \\ud800 here"}', "invalid_unicode"),
    (b'{"id": "notext", "title": "no text field"}', "missing_field"),
)


def _text(rng: random.Random, n_chars: int) -> str:
    out, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choice(WORDS) for _ in range(14)) + f" {rng.randrange(10**12)}."
        out.append(line)
        size += len(line) + 1
    return "\n".join(out)


def make_inputs(d: Path, lines: int, big_mb: float, huge_mb: float, garbage: float = 0.01,
                seed: int = 0, doc_chars: tuple[int, int] = (300, 2500)) -> dict[str, Any]:
    """Write the datasets under ``d``; returns what the import must find (good records, rejects by reason
    with their line numbers)."""
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    every = max(1, round(1 / garbage)) if garbage else 0
    expect: dict[str, Any] = {"good": 0, "rejects": {}, "reject_lines": {}, "big_line": None, "huge_line": None}
    with open(d / "recipes.jsonl", "wb") as f:
        n = 0
        k = 0
        for i in range(lines):
            n += 1
            if i == lines // 3:
                f.write(json.dumps({"id": "big", "text": _text(rng, int(big_mb * 1e6))}).encode() + b"\n")
                expect["big_line"] = n
                expect["good"] += 1
            elif i == lines // 2:
                # written in pieces: the generator stays small however large the row
                f.write(b'{"id": "huge", "text": "')
                piece = (_text(rng, 1 << 20).replace("\n", " ") + " ").encode()
                for _ in range(max(1, int(huge_mb * 1e6) // len(piece))):
                    f.write(piece)
                f.write(b'"}\n')
                expect["huge_line"] = n
                expect["rejects"]["too_large"] = expect["rejects"].get("too_large", 0) + 1
                expect["reject_lines"].setdefault("too_large", []).append(n)
            elif every and i % every == every - 1:
                raw, reason = GARBAGE[k % len(GARBAGE)]
                k += 1
                f.write(raw + b"\n")
                expect["rejects"][reason] = expect["rejects"].get(reason, 0) + 1
                expect["reject_lines"].setdefault(reason, []).append(n)
            elif i % 997 == 500:
                f.write(b"\n")  # a blank line is not a record
            else:
                f.write(json.dumps({"id": f"r{i}", "title": f"Recipe {i}",
                                    "text": f"Recipe {i}. " + _text(rng, rng.randrange(*doc_chars))}).encode() + b"\n")
                expect["good"] += 1
    art = d / "articles"
    art.mkdir(exist_ok=True)
    (art / "a-empty.jsonl").write_bytes(b"")
    with open(art / "b-some.jsonl", "w", encoding="utf-8") as f:
        for i in range(max(10, lines // 50)):
            f.write(json.dumps({"text": f"Article {i}. " + _text(rng, rng.randrange(400, 3000))}) + "\n")
            expect["good"] += 1
    return expect


def write_config(work: Path, data: Path, model: Path, max_record_mb: float, max_chars: int) -> Path:
    src = [{"id": "recipes-ds", "kind": "dataset", "category": "recipes", "path": str(data / "recipes.jsonl"),
            "id_field": "id", "title_field": "title", "max_pages": 10**9,
            "max_record_bytes": int(max_record_mb * 1e6), "permission": PERMISSION},
           {"id": "articles-ds", "kind": "dataset", "category": "articles", "path": str(data / "articles"),
            "max_pages": 10**9, "max_record_bytes": int(max_record_mb * 1e6), "permission": PERMISSION}]
    (work / "sources.yaml").write_text(yaml.safe_dump({"sources": src}))
    cfg = {"run_name": "robust", "data_root": str(work / "root"), "seed": 1,
           "scrape": {"sources": str(work / "sources.yaml")},
           "extract": {"workers": 1, "min_text_chars": 20},
           "clean": {"max_chars": max_chars, "workers": 1},
           "split": {"eval_fraction": 0.1},
           "mix": {"ratios": {"recipes": 0.7, "articles": 0.3}},
           "tokenize": {"seq_len": 256, "rows_per_shard": 512, "workers": 1},
           "model": {"name": str(model)}}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# run in the stage's own process: counts, peak RSS over the RSS after imports, wall time
_RUNNER = r"""
import importlib, json, logging, sys, time
def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
name, config = sys.argv[1], sys.argv[2]
from tasks.core.config import load_config
fn = getattr(importlib.import_module("tasks." + name), "run_" + name)
cfg = load_config(config, [])
logging.basicConfig(level=logging.WARNING)
if name in ("mix", "tokenize"):  # loading the tokenizer imports torch and transformers: a fixed cost, not data
    from tasks.core.model import model_tokenizer
    model_tokenizer(cfg.model, cfg.root / "models")
base = vm("VmRSS:")
t0 = time.monotonic()
m = fn(cfg)
print("RESULT " + json.dumps({"counts": m["counts"], "wall_s": time.monotonic() - t0, "base_rss": base,
                              "peak_rss": vm("VmHWM:")}, default=str))
"""


def run_stage(name: str, config: Path, cwd: Path, timeout: float = 3600) -> dict[str, Any]:
    p = subprocess.run([sys.executable, "-c", _RUNNER, name, str(config)], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"stage {name} failed (rc {p.returncode}):\n{p.stderr[-4000:]}")
    out = json.loads(line[len("RESULT "):])
    out["peak_delta_mb"] = (out["peak_rss"] - out["base_rss"]) / 2**20
    out["peak_rss_mb"] = out["peak_rss"] / 2**20
    return out


def summary_rows(res: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """documents in / kept / quarantined by reason per stage, from the stages' own manifests."""
    rows = []
    for name, r in res.items():
        c = r["counts"]
        if name == "scrape":
            per = c["imported_per_source"]
            n_in = c["imported"] + c["import_rejects"]
            kept, q = c["imported"], {}
            for s in per.values():
                for k, v in s["by_reason"].items():
                    q[k] = q.get(k, 0) + v
        elif name in ("extract", "clean"):
            n_in, kept, q = c["documents_in"], c["kept"], c["rejects_by_reason"]
        elif name == "split":
            n_in = res["clean"]["counts"]["rows_out"]
            kept, q = c["train"]["total"]["docs"] + c["eval"]["total"]["docs"], {}
        elif name == "mix":
            t = c["total"]
            n_in, kept, q = t["documents_in"], t["available_docs"], t["quarantined_by_reason"]
        else:
            n_in, kept, q = c["documents_in"], c["documents_packed"], c["quarantined_by_reason"]
        rows.append({"stage": name, "in": n_in, "kept": kept, "quarantined": sum(q.values()), "by_reason": q,
                     "peak_delta_mb": round(r["peak_delta_mb"]), "peak_rss_mb": round(r["peak_rss_mb"]),
                     "wall_s": round(r["wall_s"], 1)})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="local model folder with a tokenizer")
    ap.add_argument("--work", default=None, help="work folder (default: a new temp folder)")
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--big-mb", type=float, default=25)
    ap.add_argument("--huge-mb", type=float, default=200)
    ap.add_argument("--max-record-mb", type=float, default=64)
    ap.add_argument("--max-chars", type=int, default=200_000)
    ap.add_argument("--doc-chars", type=int, nargs=2, default=(200, 800), help="length range of the good documents")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    a = ap.parse_args(argv)
    import tempfile

    work = Path(a.work or tempfile.mkdtemp(prefix="bench-robust-"))
    t = time.monotonic()
    expect = make_inputs(work / "in", a.lines, a.big_mb, a.huge_mb, doc_chars=tuple(a.doc_chars))
    print(f"inputs in {time.monotonic() - t:.0f}s: {work / 'in'}; expected import rejects {expect['rejects']}", flush=True)
    config = write_config(work, work / "in", Path(a.model).resolve(), a.max_record_mb, a.max_chars)
    from tasks.core.config import REPO_ROOT as repo
    res = {}
    for name in a.stages:
        res[name] = run_stage(name, config, repo)
        print(json.dumps(summary_rows(res)[-1]), flush=True)
    print(f"\n{'stage':<10}{'in':>10}{'kept':>10}{'quarantined':>12}  {'peak MB (+over imports)':>24}  by reason")
    for r in summary_rows(res):
        print(f"{r['stage']:<10}{r['in']:>10}{r['kept']:>10}{r['quarantined']:>12}  "
              f"{r['peak_rss_mb']:>14} (+{r['peak_delta_mb']})  {r['by_reason']}")


if __name__ == "__main__":
    main()
