"""``d2a plan``: what a run will cost before it costs it.

From the config, the recorded measurements (``plan.results``, benchmarks/results.yaml) and whatever
this data root already holds, the plan states:
- each source and what it is expected to yield (the last scrape's real pages; before one,
  ``plan.expected_pages`` or the source's ``max_pages`` as an upper bound), and sources that can
  never yield a page;
- corpus and training tokens per category against the mixture target, by the mix stage's own budget
  rule (``tasks.mix.plan_total``), and which category cannot reach its share and why;
- training steps (``tasks.train.plan.plan_steps``, the function the worker uses), tokens, device-hours
  at the throughput measured for this model and operating point, and the checkpoints written;
- disk per stage.

Where a figure comes from is said beside it ("measured", "scraped", "configured", "recorded"), since an
estimate is only as good as its basis. Written to ``<data root>/plan.json`` and ``plan.md``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import yaml

from tasks.core.config import CATEGORIES, PipelineConfig, load_sources, resolve_path
from tasks.core.manifest import read_manifest, write_json_atomic

PLAN_JSON, PLAN_MD = "plan.json", "plan.md"
LORA_MODULES = {  # (in, out) of each projection LoRA can wrap, from the model's shape
    "q_proj": lambda s: (s["hidden_size"], s["num_attention_heads"] * s["head_dim"]),
    "k_proj": lambda s: (s["hidden_size"], s["num_key_value_heads"] * s["head_dim"]),
    "v_proj": lambda s: (s["hidden_size"], s["num_key_value_heads"] * s["head_dim"]),
    "o_proj": lambda s: (s["num_attention_heads"] * s["head_dim"], s["hidden_size"]),
    "gate_proj": lambda s: (s["hidden_size"], s["intermediate_size"]),
    "up_proj": lambda s: (s["hidden_size"], s["intermediate_size"]),
    "down_proj": lambda s: (s["intermediate_size"], s["hidden_size"]),
}


# --------------------------------------------------------------------------------- inputs
def load_results(cfg: PipelineConfig) -> dict[str, Any]:
    p = resolve_path(cfg.plan.results)
    if not p.is_file():
        raise FileNotFoundError(f"plan.results: {p} not found (the recorded measurements the plan uses)")
    return yaml.safe_load(p.read_text(encoding="utf-8")) or {}


def _value(cfg: PipelineConfig, dotted: str) -> Any:
    node: Any = cfg
    for k in dotted.split("."):
        node = getattr(node, k)
    return node


def pick_throughput(cfg: PipelineConfig, results: dict[str, Any]) -> dict[str, Any] | None:
    """The recorded measurement for this model at this operating point (every ``match`` key equal)."""
    for m in results.get("throughput", []):
        if m.get("model") != cfg.model.name:
            continue
        if cfg.plan.device and m.get("device") != cfg.plan.device:
            continue
        try:
            if all(_value(cfg, k) == v for k, v in (m.get("match") or {}).items()):
                return m
        except AttributeError:
            continue
    return None


def model_shape(cfg: PipelineConfig, results: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The base's shape: its config.json when it is on disk (a local path or the demo's conversion),
    else the recorded one."""
    from tasks.core.model import _slug

    for d in (resolve_path(cfg.model.name), cfg.root / "models" / _slug(cfg.model.name)):
        f = d / "config.json"
        if f.is_file():
            c = json.loads(f.read_text())
            c.setdefault("head_dim", c["hidden_size"] // c["num_attention_heads"])
            c.setdefault("num_key_value_heads", c["num_attention_heads"])
            return c, f"measured: {f}"
    rec = (results.get("models") or {}).get(cfg.model.name)
    return (dict(rec), f"recorded: {cfg.plan.results}") if rec else (None, "unknown: no config.json and no recorded shape")


def lora_params(cfg: PipelineConfig, shape: dict[str, Any] | None) -> int | None:
    """Trainable LoRA parameters: r x (in + out) per wrapped projection per layer (bias terms, which
    Llama/Mistral projections do not have, are not counted)."""
    if shape is None or any(m not in LORA_MODULES for m in cfg.lora.target_modules):
        return None
    per_layer = sum(cfg.lora.r * sum(LORA_MODULES[m](shape)) for m in cfg.lora.target_modules)
    return per_layer * shape["num_hidden_layers"]


def _raw_pages(root: Path) -> tuple[dict[str, int], dict[str, Any]] | None:
    """Pages per source id in the published raw/ (the last scrape), and its manifest."""
    m = read_manifest(root / "raw")
    if not m:
        return None
    import pyarrow.parquet as pq

    per: dict[str, int] = {}
    for f in sorted((root / "raw").glob("*/pages.parquet")):
        for sid in pq.read_table(f, columns=["source_id"]).column("source_id").to_pylist():
            per[sid] = per.get(sid, 0) + 1
    return per, m


def _du(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0


# ----------------------------------------------------------------------------------- plan

def _sources(cfg: PipelineConfig):
    """The sources file as the run will read it: the demo site's origin is only known once a run serves
    it, so a plan made outside a run gives $DEMO_SITE the configured address (the host names are all
    the plan needs)."""
    import os

    if cfg.demo_site.enabled and not os.environ.get("DEMO_SITE"):
        os.environ["DEMO_SITE"] = f"http://{cfg.demo_site.host}:{cfg.demo_site.port}"
        try:
            return load_sources(cfg.scrape.sources)
        finally:
            del os.environ["DEMO_SITE"]
    return load_sources(cfg.scrape.sources)


def make_plan(cfg: PipelineConfig) -> dict[str, Any]:
    """The plan as a dict (see the module doc); ``warnings`` lists what the flow raises before training."""
    from tasks.mix import plan_total
    from tasks.train.plan import plan_steps

    root, pc, tc = cfg.root, cfg.plan, cfg.train
    results = load_results(cfg)
    warnings: list[str] = []
    ratios = {c: float(cfg.mix.ratios.get(c, 0.0)) for c in CATEGORIES}
    scraped = _raw_pages(root)
    mix_m = read_manifest(root / "mix")
    phase = "before the first scrape" if scraped is None else "with the last scrape's page counts"

    # -- sources: what each is expected to yield
    sources = []
    for s in _sources(cfg):
        never = None
        if s.permission is None:
            never = "no permission evidence: the scraper refuses it"
        elif s.kind == "web" and not (s.start_urls or s.sitemaps):
            never = "no start_urls and no sitemaps: nothing to crawl"
        elif s.kind == "dataset" and not (s.path and resolve_path(s.path).exists()):
            never = f"dataset file {s.path} is missing: the scraper refuses the source until it is downloaded"
        if scraped is not None:
            pages, basis = scraped[0].get(s.id, 0), "scraped"
            if pages == 0 and never is None:
                never = "yielded no page in the last scrape (robots.txt, include patterns, or the site changed?)"
        elif s.id in pc.expected_pages:
            pages, basis = min(pc.expected_pages[s.id], s.max_pages), "configured (plan.expected_pages)"
        else:
            pages, basis = s.max_pages, "upper bound (max_pages)"
        if never:
            pages = 0
            warnings.append(f"source {s.id} ({s.category}) can never yield a page: {never}")
        if ratios.get(s.category, 0.0) == 0:
            warnings.append(f"source {s.id}: category {s.category} has mix ratio 0, its pages are never trained on")
        sources.append({"id": s.id, "kind": s.kind, "category": s.category, "max_pages": s.max_pages,
                        "expected_pages": pages, "basis": basis, "never_yields": never})

    # -- corpus tokens per category: pages x tokens per page, or the configured expectation
    pages_per_cat = {c: sum(x["expected_pages"] for x in sources if x["category"] == c) for c in CATEGORIES}
    measured_tpp = {}
    if mix_m and scraped is not None:  # corpus tokens per raw page, from this data root's last mix
        raw_cat = scraped[1]["counts"].get("pages_per_category", {})
        for c, r in mix_m["counts"]["categories"].items():
            if raw_cat.get(c):
                measured_tpp[c] = r["available_tokens"] / (1 - cfg.split.eval_fraction) / raw_cat[c]
    categories = {}
    for c in CATEGORIES:
        if c in pc.expected_tokens and scraped is None:
            tokens, basis = pc.expected_tokens[c], "configured (plan.expected_tokens)"
        elif c in measured_tpp:
            tokens, basis = pages_per_cat[c] * measured_tpp[c], "pages x tokens/page measured on this data root"
        elif c in pc.tokens_per_page:
            tokens, basis = pages_per_cat[c] * pc.tokens_per_page[c], "pages x plan.tokens_per_page"
        elif pages_per_cat[c] == 0:
            tokens, basis = 0, "no pages expected"
        else:
            tokens, basis = None, "unknown: set plan.tokens_per_page or plan.expected_tokens, or scrape first"
        categories[c] = {"ratio": ratios[c], "expected_pages": pages_per_cat[c],
                         "corpus_tokens": None if tokens is None else int(tokens), "basis": basis}
    known = all(v["corpus_tokens"] is not None for v in categories.values() if v["ratio"] > 0)

    # -- the mixture: the mix stage's budget rule on the training split
    mixture: dict[str, Any] = {"total_tokens": None, "budget_from": None}
    train_tokens = None
    if known:
        avail = {c: int(v["corpus_tokens"] * (1 - cfg.split.eval_fraction)) for c, v in categories.items()
                 if v["corpus_tokens"]}
        T, why = plan_total(avail, ratios, cfg.mix.total_tokens, cfg.mix.max_repeat)
        train_tokens = 0
        for c, v in categories.items():
            a = avail.get(c, 0)
            target = int(round(ratios[c] * T))
            got = min(target, int(a * cfg.mix.max_repeat))
            v.update(train_available=a, target_tokens=target, mixed_tokens=got, shortfall=target - got)
            train_tokens += got
            if target > got:
                why_short = ("no source for it" if not any(x["category"] == c for x in sources) else
                             "its sources yield no page" if pages_per_cat[c] == 0 else
                             f"{a:,} training tokens x max_repeat {cfg.mix.max_repeat:g} = {int(a * cfg.mix.max_repeat):,} "
                             f"< its target {target:,}")
                v["cannot_reach"] = why_short
                warnings.append(f"category {c} cannot reach its {ratios[c]:.0%} share: {why_short} "
                                f"(short {target - got:,} tokens; the other shares come out higher)")
        for v in categories.values():
            v["mixed_share"] = round(v.get("mixed_tokens", 0) / train_tokens, 4) if train_tokens else 0.0
        mixture = {"total_tokens": T, "budget_from": why, "mixed_tokens": train_tokens}

    # -- training: steps by the worker's own function, at the recorded throughput
    world = tc.num_processes * tc.nnodes
    seq = cfg.tokenize.seq_len
    training: dict[str, Any] = {"world_size": world, "seq_len": seq,
                                "tokens_per_step": tc.micro_batch_size * tc.grad_accum * world * seq}
    steps = None
    rows = math.ceil(train_tokens / seq) if train_tokens is not None else None  # packing fills rows (last one padded)
    if rows is not None or tc.max_steps or tc.max_tokens:
        try:
            steps = plan_steps(tc, rows if rows is not None else 10**18, seq, world)
        except ValueError as e:
            warnings.append(f"training cannot start: {e}")
    if steps:
        total = steps["total_steps"]
        training.update(rows=rows, steps=total, steps_per_epoch=steps["steps_per_epoch"] if rows else None,
                        warmup_steps=steps["warmup_steps"], eval_every=steps["eval_every"],
                        save_every=steps["save_every"], tokens=total * steps["tokens_per_step"],
                        epochs=round(total / steps["steps_per_epoch"], 3) if rows else None)
        n_cat = sum(1 for v in categories.values() if v["ratio"] > 0) or len(CATEGORIES)
        n_evals = total // steps["eval_every"] + (total % steps["eval_every"] != 0)
        # rows per category: as configured; `auto` is sized at launch from a measured pilot so that the loss's
        # standard error is below early_stopping.min_delta, at most eval_max_rows_per_category (the bound shown)
        er = tc.eval_rows_per_category
        eval_rows = (tc.eval_max_rows_per_category if er == "auto"
                     else er if er is not None else tc.eval_batches * tc.micro_batch_size)
        per_eval = n_cat * eval_rows * seq  # held-out tokens read per periodic eval (split across the ranks)
        training["periodic_eval"] = {"evaluations": n_evals, "rows_per_category": eval_rows,
                                     "sizing": "auto: at most (measured at launch)" if er == "auto" else "configured",
                                     "tokens_each": per_eval, "tokens_total": per_eval * n_evals}
        # (a small run's eval is cheap in absolute terms whatever its share: only say it where it costs hours)
        if training["tokens"] >= 1e8 and per_eval * n_evals > 0.1 * training["tokens"]:
            warnings.append(f"periodic evaluation reads up to {per_eval * n_evals / training['tokens']:.0%} as many "
                            "tokens as training (forward only, about a third of a training token each): raise "
                            "train.eval_every or lower the held-out sample (train.eval_max_rows_per_category)")
    tp = pick_throughput(cfg, results)
    if tp is None:
        warnings.append(f"no recorded throughput for {cfg.model.name} at this operating point "
                        f"(gradient_checkpointing={tc.gradient_checkpointing}, micro_batch_size={tc.micro_batch_size}, "
                        f"seq_len={seq}{', device ' + pc.device if pc.device else ''}): measure it "
                        f"(python -m benchmarks.bench_train) and add it to {pc.results}")
    else:
        training["throughput"] = {k: tp.get(k) for k in ("operating_point", "device", "tokens_per_s", "peak_gib",
                                                         "measured")}
        if "tokens" in training:
            dev_h = training["tokens"] / tp["tokens_per_s"] / 3600
            training["device_hours"] = round(dev_h, 2)
            training["wall_hours"] = round(dev_h / world, 2)

    # -- checkpoints and disk
    shape, shape_basis = model_shape(cfg, results)
    n_params = lora_params(cfg, shape)
    per_param = (results.get("disk") or {}).get("bytes_per_trainable_param") or {}
    ckpt_bytes = n_params * per_param["checkpoint"] if n_params and per_param.get("checkpoint") else None
    checkpoints: dict[str, Any] = {"trainable_params": n_params, "shape_basis": shape_basis,
                                   "bytes_each": None if ckpt_bytes is None else int(ckpt_bytes)}
    if steps:
        total, every = steps["total_steps"], steps["save_every"]
        written = [s for s in range(every, total + 1, every)]
        if not written or written[-1] != total:
            written.append(total)
        kept = min(len(written), tc.keep_checkpoints + (1 if tc.keep_best else 0))
        checkpoints.update(written=len(written), steps=written if len(written) <= 12 else
                           [*written[:5], "...", *written[-5:]], kept_at_most=kept,
                           disk_at_most=None if ckpt_bytes is None else int(kept * ckpt_bytes))
    disk = _disk(cfg, results, categories, training, n_params, checkpoints)

    plan = {
        "config": cfg.run_name, "data_root": str(root), "phase": phase,
        "model": {"name": cfg.model.name, "revision": cfg.model.revision,
                  "allow_unpinned": cfg.model.allow_unpinned},
        "sources": sources, "categories": categories, "mixture": mixture, "training": training,
        "checkpoints": checkpoints, "disk": disk, "warnings": warnings,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    from tasks.core.model import is_hub_model

    if is_hub_model(cfg.model) and not cfg.model.revision and not cfg.model.allow_unpinned:
        warnings.insert(0, f"model.revision is not set for the hub model {cfg.model.name}: training, evaluation "
                           f"and inference refuse an unpinned base (pin its commit, or model.allow_unpinned=true)")
    return plan


def _disk(cfg: PipelineConfig, results: dict[str, Any], categories: dict[str, Any], training: dict[str, Any],
          n_params: int | None, checkpoints: dict[str, Any]) -> dict[str, Any]:
    """Bytes per stage directory: this data root's own bytes per corpus token when it has been through
    the stage, else the recorded ones; tokenized shards exactly (rows x seq_len x id width)."""
    root = cfg.root
    if any(v["corpus_tokens"] is None for v in categories.values() if v["ratio"] > 0):
        return {}  # the corpus size is unknown: so is its size on disk
    corpus = sum(v["corpus_tokens"] or 0 for v in categories.values())
    mix_m = read_manifest(root / "mix")
    measured_corpus = None
    if mix_m:
        t = mix_m["counts"]["total"]["available_tokens"]
        measured_corpus = t / (1 - cfg.split.eval_fraction)
    recorded = ((results.get("disk") or {}).get("bytes_per_corpus_token") or {})
    out: dict[str, Any] = {}
    for d in ("raw", "extracted", "clean", "split", "mix", "tokcache"):
        here = _du(root / d)
        if here and measured_corpus:
            bpt, basis = here / measured_corpus, "measured on this data root"
        elif d in cfg.plan.bytes_per_token:
            bpt, basis = cfg.plan.bytes_per_token[d], "configured (plan.bytes_per_token)"
        elif d in recorded:
            bpt, basis = recorded[d], f"recorded ({cfg.plan.results})"
        else:
            continue
        out[d] = {"bytes": int(bpt * corpus), "basis": basis}
    shape_vocab = None
    if training.get("rows") is not None:
        from tasks.tokenize.format import id_dtype

        shape, _ = model_shape(cfg, results)
        shape_vocab = (shape or {}).get("vocab_size")
        width = id_dtype(shape_vocab).bit_width // 8 if shape_vocab else 4
        rows = training["rows"] * (1 + cfg.split.eval_fraction / (1 - cfg.split.eval_fraction))
        out["tokenized"] = {"bytes": int(rows * cfg.tokenize.seq_len * width), "basis": f"rows x seq_len x {width} bytes"}
    if checkpoints.get("disk_at_most") is not None:
        out["checkpoints"] = {"bytes": checkpoints["disk_at_most"], "basis": "checkpoints kept x bytes each"}
    per_param = (results.get("disk") or {}).get("bytes_per_trainable_param") or {}
    if n_params and per_param.get("adapter"):
        out["adapter"] = {"bytes": int(n_params * per_param["adapter"]), "basis": "trainable params x recorded bytes"}
    out["total"] = {"bytes": sum(v["bytes"] for v in out.values()), "basis": "sum"}
    return out


# ---------------------------------------------------------------------------------- output
def _n(x: Any) -> str:
    if x is None:
        return "?"
    if isinstance(x, float) and not x.is_integer():
        return f"{x:,.2f}"
    return f"{int(x):,}"


def _bytes(b: int | None) -> str:
    if b is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if b < 1000 or unit == "TB":
            return f"{b:,.0f} {unit}" if unit == "B" else f"{b:,.1f} {unit}"
        b /= 1000
    return "?"


def plan_markdown(p: dict[str, Any]) -> str:
    t, mix, ck = p["training"], p["mixture"], p["checkpoints"]
    rev = p["model"]["revision"] or ("UNPINNED (allowed)" if p["model"]["allow_unpinned"] else "not set")
    lines = [f"# Plan: {p['config']} ({p['phase']})", "",
             f"Data root `{p['data_root']}`; base `{p['model']['name']}` at revision `{rev}`.", "",
             "## Sources", "", "| source | kind | category | expected pages | basis |", "|---|---|---|---:|---|"]
    for s in p["sources"]:
        lines.append(f"| {s['id']} | {s['kind']} | {s['category']} | {_n(s['expected_pages'])} | {s['basis']}"
                     + (f"; **never yields**: {s['never_yields']}" if s["never_yields"] else "") + " |")
    lines += ["", "## Tokens per category", "",
              "| category | ratio | corpus tokens | training tokens available | target | mixed | share | basis |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for c, v in p["categories"].items():
        note = f"; **cannot reach its share**: {v['cannot_reach']}" if v.get("cannot_reach") else ""
        lines.append(f"| {c} | {v['ratio']:.0%} | {_n(v['corpus_tokens'])} | {_n(v.get('train_available'))} | "
                     f"{_n(v.get('target_tokens'))} | {_n(v.get('mixed_tokens'))} | "
                     f"{v.get('mixed_share', 0):.1%} | {v['basis']}{note} |")
    lines += ["", f"Mixture budget {_n(mix['total_tokens'])} tokens (from {mix['budget_from'] or '?'}); "
                  f"{_n(mix.get('mixed_tokens'))} tokens mixed.", "", "## Training", ""]
    if "steps" in t:
        lines += [f"- {_n(t['steps'])} optimizer steps of {_n(t['tokens_per_step'])} tokens "
                  f"({t['world_size']} process(es)) = **{_n(t['tokens'])} training tokens**"
                  + (f", {t['epochs']} epochs of {_n(t['rows'])} packed rows" if t.get("rows") else ""),
                  f"- warmup {t['warmup_steps']} steps; eval every {t['eval_every']}, save every {t['save_every']}"]
        pe = t.get("periodic_eval")
        if pe:
            lines.append(f"- periodic eval: {pe['evaluations']} x {pe['rows_per_category']} held-out rows per category "
                         f"({pe.get('sizing', 'configured')}) "
                         f"= {_n(pe['tokens_each'])} tokens each, {_n(pe['tokens_total'])} in all")
    else:
        lines.append("- steps: unknown until the corpus size is (scrape first, or set plan.expected_tokens)")
    tp = t.get("throughput")
    if tp:
        lines.append(f"- throughput: {_n(tp['tokens_per_s'])} tokens/s per device, {tp['device']}, operating point "
                     f"'{tp['operating_point']}'" + (f" ({tp['peak_gib']} GiB)" if tp.get("peak_gib") else "")
                     + f"; recorded: {tp['measured']}")
        if "device_hours" in t:
            lines.append(f"- **{_n(t['device_hours'])} {tp['device']} device-hours**, "
                         f"{_n(t['wall_hours'])} h wall-clock on {t['world_size']} device(s) (linear scaling assumed)")
    lines += ["", "## Checkpoints", "",
              f"- {_n(ck['trainable_params'])} trainable LoRA parameters ({ck['shape_basis']}); "
              f"{_bytes(ck['bytes_each'])} per checkpoint"]
    if "written" in ck:
        lines.append(f"- {ck['written']} written, at steps {', '.join(str(s) for s in ck['steps'])}; at most "
                     f"{ck['kept_at_most']} kept ({_bytes(ck['disk_at_most'])})")
    lines += ["", "## Disk", "", "| directory | size | basis |", "|---|---:|---|"]
    for d, v in p["disk"].items():
        lines.append(f"| {d} | {_bytes(v['bytes'])} | {v['basis']} |")
    if not p["disk"]:
        lines.append("| all | ? | unknown until the corpus size is |")
    lines += ["", "## Warnings", ""] + ([f"- {w}" for w in p["warnings"]] or ["- none"])
    return "\n".join(lines) + "\n"


def write_plan(cfg: PipelineConfig, plan: dict[str, Any]) -> tuple[Path, Path]:
    root = cfg.root
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / PLAN_JSON, plan)
    md = root / PLAN_MD
    tmp = md.with_name(md.name + ".partial")
    tmp.write_text(plan_markdown(plan), encoding="utf-8")
    tmp.replace(md)
    return root / PLAN_JSON, md


def run_plan(cfg: PipelineConfig) -> dict[str, Any]:
    """Make, save and return the plan."""
    plan = make_plan(cfg)
    write_plan(cfg, plan)
    return plan
