"""Extraction on real pages, side by side with the plain libraries it builds on.

    python benchmarks/bench_extract.py recipes  --corpus /path/recipe-scrapers/tests/test_data --split dev
    python benchmarks/bench_extract.py articles --corpus /path/trafilatura/tests
    python benchmarks/bench_extract.py products --corpus /path/extruct/tests/samples

The corpus is read from the path given (nothing third-party lives in this repository):
- recipes: recipe-scrapers' ``<site>/<name>.testhtml`` + ``<name>.json`` (title, ingredients). ``--split dev``
  takes the sites whose folder name sorts before "m" (develop and tune on these only), ``--split heldout``
  the others (acceptance, run once).
- articles: trafilatura's evaluation corpus: ``evaldata.json`` (url -> file, ``with``/``without`` snippets)
  with the pages in ``cache/`` or ``eval/``; scored exactly as trafilatura's ``tests/eval_common.py`` does.

- products: extruct's own test samples (microdata, RDFa, JSON-LD, Open Graph): every page on which plain
  ``extruct.extract`` (all syntaxes) finds a schema.org Product is run through the project's product parsers
  (``extract_page``, product_descriptions and product_compositions, in process: these are markup samples,
  not sites), and each fact extruct reads (name, description, brand, price, gtin) is looked up in the record.

Recipes and articles are served on loopback as many sites (one source per site folder, spread over up to 16 hosts),
then the project's own stages run as a new user would run them: ``run_scrape`` with a sources file that
lists each site, ``run_extract`` (one worker). The baseline runs in the same process on the very pages
the scrape stored (same bytes, same scoring):
- recipes: ``trafilatura.extract`` + extruct's JSON-LD Recipe name and recipeIngredient;
- articles: ``trafilatura.extract`` with trafilatura's canonical evaluation settings.

Scores:
- title / ingredient recall: the expected line, normalized to lower-case words, appears in the document's
  record (title, text and every field value, also normalized); a page without a document scores 0.
- body F1: trafilatura's evaluation: a ``with`` snippet found in the text is a true positive, a ``without``
  snippet found a false positive (whitespace-normalized substring match); F1 over the whole corpus.
- entity docs: records (title, text or any field) holding an HTML entity (``&amp;``, ``&#39;`` ...), an
  escaped or raw markup fragment (``<p>``, ``&lt;div``) or double escaping (``&amp;amp;``).
- boilerplate docs: records holding a consent/cookie/newsletter/share/comment-form line.
- pages/s per core: pages divided by the CPU seconds of the extraction (process + children), so other
  load on the machine does not count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import re
import resource
import shutil
import tempfile
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pyarrow.parquet as pq
import yaml

N_HOSTS = 16
PERMISSION = {"evidence_url": "https://example.org/benchmark", "license": "research-benchmark",
              "note": "local copy of a public test corpus, served on loopback"}

# ------------------------------------------------------------------------------------------ scoring
_FRACTIONS = {"¼": " 1/4", "½": " 1/2", "¾": " 3/4", "⅓": " 1/3", "⅔": " 2/3", "⅛": " 1/8", "⅜": " 3/8",
              "⅝": " 5/8", "⅞": " 7/8", "⅕": " 1/5", "⅙": " 1/6"}
_FRAC_RE = re.compile("|".join(_FRACTIONS))


def words(text: str) -> str:
    """Lower-case words separated by single spaces (both sides of every comparison go through this)."""
    text = _FRAC_RE.sub(lambda m: _FRACTIONS[m.group(0)], unicodedata.normalize("NFC", text).replace("\u00ad", ""))
    return " ".join(re.findall(r"\w+", text.lower()))


def contains(hay_words: str, needle: str) -> bool:
    n = words(needle)
    return not n or f" {n} " in f" {hay_words} "


def flat_values(v: Any) -> list[str]:
    if isinstance(v, dict):
        return [s for x in v.values() for s in flat_values(x)]
    if isinstance(v, list):
        return [s for x in v for s in flat_values(x)]
    return [str(v)] if isinstance(v, str) else []


ENTITY = re.compile(r"&(?:#\d{1,7}|#x[0-9a-f]{1,6}|[a-z][a-z0-9]{1,31});", re.IGNORECASE)
MARKUP = re.compile(r"</?(?:p|div|span|br|a|b|i|em|strong|li|ul|ol|h[1-6]|img|script|style|table|tr|td)\b[^>]*>",
                    re.IGNORECASE)
BOILERPLATE = re.compile(
    r"(?i)\b(?:we use cookies|this (?:web)?site uses cookies|cookie (?:policy|settings|preferences|consent)|"
    r"accept (?:all )?cookies|manage (?:your )?(?:cookie|consent|privacy) (?:settings|preferences|choices)|"
    r"sign up for (?:our|the) newsletter|subscribe to (?:our|the) newsletter|share (?:this|on) (?:facebook|twitter|"
    r"pinterest|recipe|article|post)|leave a (?:comment|reply)|your email address will not be published|"
    r"save my name, email|durch die nutzung eines buttons|wir verwenden cookies|diese website verwendet cookies|"
    r"nous utilisons des cookies)")


def dirty(record_strings: list[str]) -> tuple[bool, bool]:
    """(entity or markup fragment present, consent/share boilerplate present) in any of the strings."""
    ent = any(ENTITY.search(s) or MARKUP.search(s) for s in record_strings)
    boiler = any(BOILERPLATE.search(s) for s in record_strings)
    return ent, boiler


# ------------------------------------------------------------------------------------------ corpora
def recipe_pages(corpus: Path, split: str, limit: int | None) -> dict[str, list[tuple[str, Path, dict]]]:
    """{site: [(page name, html path, expected)]} for the chosen half of the sites."""
    sites: dict[str, list[tuple[str, Path, dict]]] = {}
    for d in sorted(p for p in corpus.iterdir() if p.is_dir()):
        held_out = d.name.lower() >= "m"
        if (split == "dev" and held_out) or (split == "heldout" and not held_out):
            continue
        for html in sorted(d.glob("*.testhtml")):
            exp = html.with_suffix(".json")
            if not exp.is_file():
                continue
            try:
                expected = json.loads(exp.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            if expected.get("title") or expected.get("ingredients"):
                sites.setdefault(d.name, []).append((html.stem, html, expected))
    if limit:
        sites = dict(list(sites.items())[:limit])
    return sites


def article_pages(corpus: Path, limit: int | None) -> dict[str, list[tuple[str, Path, dict]]]:
    """{site: [(page name, html path, expected with/without)]}: one site per page's host."""
    if not (corpus / "evaldata.json").is_file():
        return {}
    data = json.loads((corpus / "evaldata.json").read_text(encoding="utf-8"))
    sites: dict[str, list[tuple[str, Path, dict]]] = {}
    for i, (url, item) in enumerate(sorted(data.items())):
        path = next((corpus / sub / item["file"] for sub in ("cache", "eval")
                     if (corpus / sub / item["file"]).is_file()), None)
        if path is None:
            continue
        host = re.sub(r"[^a-z0-9.-]", "-", (url.split("/") + ["", "", ""])[2].lower()) or "site"
        sites.setdefault(host, []).append((f"p{i}", path, item))
    if limit:
        sites = dict(list(sites.items())[:limit])
    return sites


_JSONLD = re.compile(rb"<script[^>]*application/ld\+json[^>]*>.*?</script\s*>", re.S | re.I)
_MARKUP_ATTR = re.compile(rb"""\s(?:itemprop|itemscope|itemtype|itemid|vocab|typeof|property)(?:\s*=\s*(?:"[^"]*"|'[^']*'|[^\s>]+))?""",
                          re.I)


def strip_markup(html: bytes) -> bytes:
    """The page without its structured data (JSON-LD blocks, microdata and RDFa attributes): what the
    text fallback must cope with on a site that publishes none (``--strip-markup``)."""
    return _MARKUP_ATTR.sub(b"", _JSONLD.sub(b"", html))


def build_site(sites: dict[str, list[tuple[str, Path, dict]]], root: Path,
               no_markup: bool = False) -> dict[str, tuple[str, dict]]:
    """Copy pages to root/<site>/<name>.html with an index per site; returns {path: (site, expected)}."""
    expected: dict[str, tuple[str, dict]] = {}
    for site, pages in sites.items():
        (root / site).mkdir(parents=True, exist_ok=True)
        for name, src, exp in pages:
            if no_markup:
                (root / site / f"{name}.html").write_bytes(strip_markup(src.read_bytes()))
            else:
                shutil.copyfile(src, root / site / f"{name}.html")
            expected[f"/{site}/{name}.html"] = (site, exp)
        links = "".join(f'<li><a href="{quote(n)}.html">{n}</a></li>' for n, _, _ in pages)
        (root / site / "index.html").write_text(f"<html><body><main><ul>{links}</ul></main></body></html>")
    (root / "robots.txt").write_text("User-agent: *\nAllow: /\n")
    return expected


def _serve(root: str, n_hosts: int, conn: Any) -> None:
    from scrapers.testsite import serve_site

    with contextlib.ExitStack() as stack:
        conn.send([stack.enter_context(serve_site(root)).url for _ in range(n_hosts)])
        conn.recv()


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


# ------------------------------------------------------------------------------------------ baselines
def baseline_recipe(html: str, url: str) -> dict[str, Any]:
    """Plain trafilatura text + extruct's JSON-LD Recipe name and ingredients (what a user writes in 40 lines)."""
    import extruct
    import trafilatura

    text = trafilatura.extract(html, url=url, include_comments=False, include_tables=True) or ""
    title, ingredients = "", []
    try:
        items = extruct.extract(html, base_url=url, syntaxes=["json-ld"], uniform=True).get("json-ld", [])
    except Exception:  # noqa: BLE001 - broken JSON-LD: text only
        items = []
    stack = list(items)
    while stack:
        it = stack.pop()
        if isinstance(it, list):
            stack.extend(it)
        elif isinstance(it, dict):
            stack.extend(it.get("@graph") or [])
            t = it.get("@type")
            if "Recipe" in (t if isinstance(t, list) else [t]):
                title = title or str(it.get("name") or "")
                ingredients = ingredients or [str(i) for i in (it.get("recipeIngredient") or [])]
    if not text and not title:
        return {}
    return {"title": title, "text": text, "fields": {"ingredients": ingredients}}


def baseline_article(html: str, url: str) -> dict[str, Any]:
    import trafilatura

    text = trafilatura.extract(html, url=url, include_comments=False, include_tables=True,
                               include_formatting=False)
    return {"title": "", "text": text, "fields": {}} if text else {}


# ------------------------------------------------------------------------------------------ the run
def run(kind: str, corpus: Path, split: str, limit: int | None, work: Path, keep: bool,
        no_markup: bool = False) -> dict[str, Any]:
    from scrapers.common import decode_body
    from tasks.core.config import PipelineConfig
    from tasks.extract import run_extract
    from tasks.scrape import run_scrape

    sites = recipe_pages(corpus, split, limit) if kind == "recipes" else article_pages(corpus, limit)
    if not sites:
        want = "<site>/<name>.testhtml + .json (recipe-scrapers' tests/test_data)" if kind == "recipes" \
            else "evaldata.json and cache/ (trafilatura's tests/)"
        raise SystemExit(f"bench_extract: no {kind} pages under {corpus}: it should hold {want}")
    category = "recipes" if kind == "recipes" else "articles"
    expected = build_site(sites, work / "site", no_markup)
    parent, child = mp.Pipe()
    server = mp.get_context("spawn").Process(target=_serve, args=(str(work / "site"), N_HOSTS, child), daemon=True)
    server.start()
    urls = parent.recv()
    try:
        sources = [{"id": f"{kind}-{site}", "category": category, "start_urls": [f"{urls[i % len(urls)]}/{site}/"],
                    "include": [f"/{site}/"], "permission": PERMISSION} for i, site in enumerate(sites)]
        (work / "sources.yaml").write_text(yaml.safe_dump({"sources": sources}))
        cfg = PipelineConfig.model_validate({
            "data_root": str(work / "data"),
            "scrape": {"sources": str(work / "sources.yaml"), "min_delay_s": 0.0, "max_bytes": 30_000_000,
                       "allow_private_addresses": ["127.0.0.1"]},
            "extract": {"workers": 1}, "model": {"name": "unused"}})
        t0 = time.monotonic()
        run_scrape(cfg)
        scrape_s = time.monotonic() - t0
    finally:
        parent.send("stop")
        server.join(timeout=10)
    c0, t0 = _cpu(), time.monotonic()
    manifest = run_extract(cfg)
    proj_cpu, proj_wall = _cpu() - c0, time.monotonic() - t0

    raw = pq.read_table(work / "data" / "raw" / category / "pages.parquet").to_pylist()
    docs = {}
    out = work / "data" / "extracted" / f"{category}.parquet"
    if out.is_file():
        for r in pq.read_table(out).to_pylist():
            docs[r["url"].split("/", 3)[3]] = {"title": r["title"], "text": r["text"],
                                                "fields": json.loads(r["fields"])}
    rejects = {r["url"].split("/", 3)[3]: r["reason"]
               for r in pq.read_table(work / "data" / "extracted" / "rejects.parquet").to_pylist()}
    base_fn: Callable[[str, str], dict[str, Any]] = baseline_recipe if kind == "recipes" else baseline_article
    base_docs = {}
    c0, t0 = _cpu(), time.monotonic()
    for row in raw:  # every stored page, index pages included, as the stage saw them
        html, _ = decode_body(row["body"], row.get("content_type"))
        try:
            d = base_fn(html, row["url"])
        except Exception:  # noqa: BLE001 - a crash is a lost page, as for the project
            d = {}
        if d:
            base_docs["/" + row["url"].split("/", 3)[3]] = d
    base_cpu, base_wall = _cpu() - c0, time.monotonic() - t0
    traf_cpu = base_cpu
    if kind == "recipes":  # the throughput goal is against plain trafilatura alone on the same pages
        import trafilatura

        htmls = [decode_body(row["body"], row.get("content_type"))[0] for row in raw]
        c0 = _cpu()
        for html in htmls:
            trafilatura.extract(html, include_comments=False, include_tables=True)
        traf_cpu = _cpu() - c0
    proj_docs = {"/" + k: v for k, v in docs.items()}
    stored = {"/" + r["url"].split("/", 3)[3] for r in raw}

    def score(found: dict[str, dict[str, Any]]) -> dict[str, Any]:
        s: dict[str, Any] = {"pages": len(stored & set(expected)), "documents": 0, "lost": [], "entity_docs": 0,
                             "boilerplate_docs": 0}
        t_hit = t_all = i_hit = i_all = tp = fp = fn = 0
        for path, (_, exp) in expected.items():
            if path not in stored:  # refused by the page's own opt-out (noindex, tdm-reservation): same for both
                continue
            d = found.get(path)
            if d is None:
                s["lost"].append(path)
            else:
                s["documents"] += 1
                strings = [d["title"] or "", d["text"] or "", *flat_values(d["fields"])]
                ent, boiler = dirty(strings)
                s["entity_docs"] += ent
                s["boilerplate_docs"] += boiler
            record = words(" \n ".join([d["title"] or "", d["text"] or "", *flat_values(d["fields"])])) if d else ""
            if kind == "recipes":
                if exp.get("title"):
                    t_all += 1
                    t_hit += bool(d) and contains(record, exp["title"])
                ings = exp.get("ingredients") or []
                for ing in (ings.split("\n") if isinstance(ings, str) else ings):  # one corpus file has a string
                    if words(ing):
                        i_all += 1
                        i_hit += bool(d) and contains(record, ing)
            else:
                text = re.sub(r"\s+", " ", d["text"] or "") if d else ""
                w = sum(1 for x in exp["with"] if re.sub(r"\s+", " ", x).strip() in text)
                tp += w
                fn += len(exp["with"]) - w
                fp += sum(1 for x in exp["without"] if re.sub(r"\s+", " ", x).strip() in text)
        if kind == "recipes":
            s["title_recall"] = t_hit / max(t_all, 1)
            s["ingredient_recall"] = i_hit / max(i_all, 1)
        else:
            s["precision"] = tp / max(tp + fp, 1)
            s["recall"] = tp / max(tp + fn, 1)
            s["f1"] = 2 * tp / max(2 * tp + fp + fn, 1)
        return s

    res = {"kind": kind, "split": split, "sites": len(sites), "pages": len(expected), "stored": len(stored & set(
        expected)), "raw_rows": len(raw), "scrape_s": round(scrape_s, 1),
        "project": {**score(proj_docs), "cpu_s": proj_cpu, "wall_s": proj_wall,
                    "rejects": {p: rejects.get(p[1:]) for p in expected if p not in proj_docs}},
        "baseline": {**score(base_docs), "cpu_s": base_cpu, "wall_s": base_wall},
        "manifest_counts": manifest["counts"]}
    for side in ("project", "baseline"):
        res[side]["pages_per_s_core"] = len(raw) / max(res[side]["cpu_s"], 1e-9)
    res["trafilatura_pages_per_s_core"] = len(raw) / max(traf_cpu, 1e-9)
    if keep:
        (work / "result.json").write_text(json.dumps(res, indent=1, default=str))
    return res


def table(res: dict[str, Any]) -> str:
    p, b = res["project"], res["baseline"]
    rows = [("pages (sites)", f"{res['pages']} ({res['sites']})", f"{res['pages']} ({res['sites']})"),
            ("refused by the page's opt-out (noindex/TDM), not scored", str(res["pages"] - res["stored"]),
             str(res["pages"] - res["stored"])),
            ("documents (pages lost)", f"{p['documents']} ({len(p['lost'])})", f"{b['documents']} ({len(b['lost'])})")]
    if res["kind"] == "recipes":
        rows += [("title recall", f"{p['title_recall']:.3f}", f"{b['title_recall']:.3f}"),
                 ("ingredient recall", f"{p['ingredient_recall']:.3f}", f"{b['ingredient_recall']:.3f}")]
    else:
        rows += [("body F1 (precision / recall)", f"{p['f1']:.3f} ({p['precision']:.3f} / {p['recall']:.3f})",
                  f"{b['f1']:.3f} ({b['precision']:.3f} / {b['recall']:.3f})")]
    rows += [("docs with entities / markup", str(p["entity_docs"]), str(b["entity_docs"])),
             ("docs with consent/share boilerplate", str(p["boilerplate_docs"]), str(b["boilerplate_docs"])),
             (f"pages/s per core ({res['raw_rows']} stored pages)", f"{p['pages_per_s_core']:.1f}",
              f"{b['pages_per_s_core']:.1f}"),
             ("extract CPU s (wall s)", f"{p['cpu_s']:.1f} ({p['wall_s']:.1f})", f"{b['cpu_s']:.1f} ({b['wall_s']:.1f})")]
    base = "trafilatura + extruct JSON-LD" if res["kind"] == "recipes" else "trafilatura.extract"
    out = [f"{res['kind']} ({res['split']})", "", f"| | this project | {base} |", "|---|---|---|"]
    out += [f"| {a} | {x} | {y} |" for a, x, y in rows]
    t = res["trafilatura_pages_per_s_core"]
    out.append(f"\nplain trafilatura.extract alone: {t:.1f} pages/s per core; project / trafilatura: "
               f"{p['pages_per_s_core'] / max(t, 1e-9):.2f}")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ products
PRODUCT_TYPES = {"product", "individualproduct", "productmodel", "foodproduct"}


def extruct_products(data: Any) -> list[dict[str, Any]]:
    """Product items anywhere in extruct's uniform output (nested in offers, orders, @graph)."""
    out: list[dict[str, Any]] = []
    stack = [data]
    while stack:
        o = stack.pop()
        if isinstance(o, list):
            stack.extend(o)
        elif isinstance(o, dict):
            t = o.get("@type")
            if any(isinstance(x, str) and x.rsplit("/", 1)[-1].lower() in PRODUCT_TYPES
                   for x in (t if isinstance(t, list) else [t])):
                out.append(o)
            stack.extend(v for v in o.values() if isinstance(v, (dict, list)))
    return out


def product_facts(item: dict[str, Any]) -> dict[str, str]:
    def one(v: Any) -> str:
        v = v[0] if isinstance(v, list) and v else v
        if isinstance(v, dict):
            v = v.get("name") or v.get("@value") or ""
        return str(v or "").strip()

    offer = item.get("offers")
    offer = (offer[0] if isinstance(offer, list) and offer else offer) or {}
    offer = offer if isinstance(offer, dict) else {}
    facts = {"name": one(item.get("name")), "description": one(item.get("description")),
             "brand": one(item.get("brand")), "price": one(offer.get("price") or offer.get("lowPrice")),
             "gtin": one(item.get("gtin13") or item.get("gtin") or item.get("gtin12") or item.get("gtin8"))}
    return {k: v for k, v in facts.items() if v}


def run_products(corpus: Path) -> dict[str, Any]:
    import extruct

    from scrapers.extract_page import extract_page

    pages = found = docs = 0
    hits: dict[str, list[int]] = {}
    cpu = {"project": 0.0, "extruct": 0.0}
    rows = []
    for path in sorted(corpus.rglob("*.html")):
        body = path.read_bytes()
        url = "http://example.org/" + quote(path.name)
        c0 = _cpu()
        try:
            data = extruct.extract(body, base_url=url, uniform=True)
        except Exception:  # noqa: BLE001 - a sample extruct itself cannot read
            data = {}
        cpu["extruct"] += _cpu() - c0
        pages += 1
        products = [p for p in extruct_products(data) if product_facts(p).get("name")]
        if not products:
            continue
        found += 1
        record, got = "", False
        c0 = _cpu()
        for category in ("product_descriptions", "product_compositions"):
            d, rej = extract_page({"url": url, "category": category, "source_id": "bench", "sha256": "",
                                   "body": body, "content_type": "text/html"}, 1)
            if d is not None:
                got = True
                record += " " + words(" \n ".join([d["title"], d["text"], *flat_values(json.loads(d["fields"]))]))
        cpu["project"] += _cpu() - c0
        docs += got
        facts = product_facts(max(products, key=lambda p: len(product_facts(p))))
        for k, v in facts.items():
            h = hits.setdefault(k, [0, 0])
            h[1] += 1
            h[0] += contains(record, v)
        rows.append((str(path.relative_to(corpus)), got, {k: contains(record, v) for k, v in facts.items()}))
    return {"kind": "products", "pages": pages, "with_product": found, "documents": docs, "facts": hits,
            "cpu": cpu, "rows": rows}


def products_table(res: dict[str, Any]) -> str:
    out = ["products (extruct's test samples)", "", "| | this project | plain extruct (all syntaxes) |", "|---|---|---|",
           f"| sample pages / with a schema.org Product | {res['pages']} / {res['with_product']} | "
           f"{res['pages']} / {res['with_product']} |",
           f"| Product pages with a document | {res['documents']} | - |"]
    for k, (hit, n) in sorted(res["facts"].items()):
        out.append(f"| Product {k} found in the record | {hit}/{n} | {n}/{n} |")
    out.append(f"| CPU s (project: Product pages, both categories; extruct: all pages) | "
               f"{res['cpu']['project']:.2f} | {res['cpu']['extruct']:.2f} |")
    out.append("")
    out += [f"- {name}: {'document' if got else 'no document'}; " +
            ", ".join(f"{k} {'yes' if ok else 'NO'}" for k, ok in facts.items()) for name, got, facts in res["rows"]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=["recipes", "articles", "products"])
    ap.add_argument("--corpus", required=True, type=Path,
                    help="recipes: recipe-scrapers' tests/test_data; articles: trafilatura's tests/ folder")
    ap.add_argument("--split", choices=["dev", "heldout", "all"], default="dev",
                    help="recipes: dev = sites before 'm' (tune here), heldout = the rest (acceptance)")
    ap.add_argument("--limit", type=int, help="at most this many sites (quick runs)")
    ap.add_argument("--work", type=Path, help="keep the served site, data root and result.json here")
    ap.add_argument("--show-lost", action="store_true", help="list pages without a document and why")
    ap.add_argument("--strip-markup", action="store_true",
                    help="serve the pages without JSON-LD, microdata or RDFa: scores the text fallback alone")
    args = ap.parse_args(argv)
    if args.kind == "products":
        print(products_table(run_products(args.corpus)))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-extract-"))
    if work.exists() and args.work:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        res = run(args.kind, args.corpus, args.split if args.kind == "recipes" else "all", args.limit, work,
                  keep=bool(args.work), no_markup=args.strip_markup)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if args.show_lost:
        for path, why in res["project"]["rejects"].items():
            print(f"lost {path}: {why}")
    print(table(res))
    print(f"\n(scrape {res['scrape_s']} s; {res['stored']}/{res['pages']} corpus pages stored; "
          f"{os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
