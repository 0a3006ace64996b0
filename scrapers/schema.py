"""The scraper's own schema: sources (what may be fetched, with evidence of permission) and the
crawl settings. The pipeline config nests these sections; this package imports nothing from tasks/.

Also the repository root (relative config paths are resolved against it) and the config error type,
which every layer above shares.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent  # the one definition; everything else imports it

CATEGORIES = (
    "recipes",
    "product_compositions",
    "articles",
    "code",
    "product_descriptions",
    "chemical_additives",
)


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the file and the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _format_errors(err: ValidationError, where: str) -> str:
    lines = [f"{where}: {err.error_count()} problem(s)"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif e["type"] == "missing" or isinstance(e.get("input"), dict):
            lines.append(f"  {key}: {e['msg']}")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e['input']!r})")
    return "\n".join(lines)



def resolve_path(p: str | os.PathLike[str]) -> Path:
    """Relative paths in configs are relative to the repository root, not the current directory."""
    path = Path(os.path.expandvars(str(p))).expanduser()
    return path if path.is_absolute() else (REPO_ROOT / path)



# ----------------------------------------------------------------------------------- sources
class Permission(Section):
    evidence_url: str = Field(description="Terms or licence page that permits this use.")
    license: str = Field(description="Licence of the content, e.g. CC-BY-4.0.")
    note: str = Field(default="", description="Who granted what, and when; free text for audits.")


class SourceConfig(Section):
    id: str = Field(description="Stable source id, recorded on every document.")
    category: str = Field(description="One of the six categories.")
    kind: Literal["web", "dataset"] = Field(
        default="web", description="web = crawl start_urls/sitemaps; dataset = import a local file or saved dataset."
    )
    start_urls: list[str] = Field(default_factory=list)
    sitemaps: list[str] = Field(default_factory=list)
    include: list[str] = Field(
        default_factory=list,
        description="URL path prefixes this source may follow; empty = the start URLs' directories.",
    )
    max_pages: int = Field(default=10_000, ge=1, description="Pages (web) or rows (dataset) taken at most.")
    # -- kind: dataset ---------------------------------------------------------------------
    path: str | None = Field(
        default=None,
        description="dataset: a file (.jsonl/.json/.csv/.tsv/.parquet, .gz allowed for text formats), a folder of "
        "such files, or a `datasets` dataset saved with save_to_disk. Relative paths are from the repo.",
    )
    format: Literal["auto", "jsonl", "csv", "tsv", "parquet", "hf_disk"] = Field(
        default="auto", description="dataset: file format; auto = from the suffix (a folder with "
        "dataset_info.json or dataset_dict.json is hf_disk)."
    )
    split: str | None = Field(default=None, description="dataset: split of a saved DatasetDict (e.g. train).")
    text_field: str = Field(default="text", description="dataset: column holding the document text.")
    text_format: Literal["text", "html"] = Field(
        default="text", description="dataset: html = the text column is HTML, parsed by the category parser."
    )
    title_field: str | None = Field(default=None, description="dataset: column holding the title.")
    id_field: str | None = Field(
        default=None, description="dataset: column with a stable record id (default: the row number)."
    )
    url_field: str | None = Field(default=None, description="dataset: column with the record's original URL.")
    field_map: dict[str, str] = Field(
        default_factory=dict,
        description="dataset: structured fields to keep, {field name in extracted/: column in the dataset}.",
    )
    encoding: str = Field(default="utf-8", description="dataset: text encoding of JSONL/CSV files.")
    max_record_bytes: int = Field(
        default=64 << 20, gt=0,
        description="dataset: a record (JSONL line, CSV field, text of a row) larger than this is quarantined "
        "as too_large, read in bounded memory. Long documents below it are split by clean (clean.max_chars).",
    )
    permission: Permission | None = Field(
        default=None, description="Evidence of permission; a source without it is refused."
    )

    @field_validator("category")
    @classmethod
    def _known_category(cls, v: str) -> str:
        if v not in CATEGORIES:
            raise ValueError(f"unknown category {v!r}; expected one of {', '.join(CATEGORIES)}")
        return v


class SourcesFile(Section):
    variables: list[str] = Field(
        default_factory=list,
        description="Environment variables this file may use as ${NAME} (e.g. DEMO_SITE); any other $NAME is an "
        "error. Names that look like secrets (TOKEN, SECRET, PASSWORD, KEY, ...) cannot be declared.",
    )
    sources: list[SourceConfig]

    @model_validator(mode="after")
    def _no_conflicts(self) -> SourcesFile:
        # a source that can never receive a page, or that shares pages with another, is a config error
        from scrapers.sources import source_conflicts

        problems = source_conflicts(self.sources)
        if problems:
            raise ValueError("; ".join(problems))
        return self


class DemoSiteConfig(Section):
    enabled: bool = Field(default=False, description="Serve data/demo_site on loopback for the run.")
    root: str = "data/demo_site"
    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535, description="0 picks a free port.")


class ScrapeConfig(Section):
    sources: str = Field(description="YAML file listing the allow-listed sources.")
    user_agent: str = "data-to-adapter/0.1 (+mailto:data-team@example.org)"
    min_delay_s: float = Field(default=1.0, ge=0, description="Per-host minimum delay between requests.")
    timeout_s: float = Field(default=20.0, gt=0, description="Per socket operation: connect, and each read.")
    request_deadline_s: float = Field(
        default=60.0, gt=0,
        description="Total time one request may take, DNS + connect + headers + body; a server that trickles "
        "bytes is cut off here (fetch log: error, reason 'deadline').",
    )
    dns_timeout_s: float = Field(default=5.0, gt=0, description="A host name lookup taking longer is an error.")
    max_bytes: int = Field(default=5_000_000, gt=0, description="Bodies larger than this are refused.")
    max_retries: int = Field(default=3, ge=0)
    allow_private_addresses: list[str] = Field(
        default_factory=list,
        description="Addresses that may be contacted although private/loopback (demo and tests only).",
    )
    respect_noindex: bool = True
    max_parallel_hosts: int = Field(default=16, ge=1, description="Hosts crawled at once (each one at a time).")
    max_crawl_delay_s: float = Field(
        default=300.0, gt=0,
        description="A host whose robots.txt Crawl-delay/Request-rate asks for a longer pause is skipped "
        "(refused_robots), never crawled faster than it asked.",
    )
    robots_ttl_s: float = Field(default=86_400.0, gt=0, description="robots.txt is re-fetched after this long.")
    follow_robots_sitemaps: bool = Field(default=True, description="Also read the sitemaps robots.txt lists.")

    @field_validator("user_agent")
    @classmethod
    def _contact(cls, v: str) -> str:
        if not re.search(r"(https?://\S+|mailto:\S+|[\w.+-]+@[\w-]+\.[\w.-]+)", v):
            raise ValueError("user_agent must identify the crawler and give a contact (an http(s) URL or e-mail), "
                             "e.g. 'mybot/1.0 (+mailto:data@example.org)'")
        return v



_VAR_REF = re.compile(r"\$(?:\{([^}]*)\}?|([A-Za-z_][A-Za-z0-9_]*))")
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|PASSWD|API_?KEY|ACCESS_?KEY|PRIVATE|CREDENTIAL|AUTH|COOKIE|SESSION",
                          re.IGNORECASE)


def _expand_declared(node: Any, declared: dict[str, str | None], where: str) -> Any:
    """Expand ${NAME}/$NAME in every string of ``node`` if NAME is declared; anything else is an error.

    Only the declared names are read from the environment, so a ${HF_TOKEN} pasted into a URL can never
    be sent to a site or written to the fetch log."""
    if isinstance(node, dict):
        return {k: _expand_declared(v, declared, f"{where}.{k}") for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_declared(v, declared, f"{where}.{i}") for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) if m.group(1) is not None else m.group(2)
        if name not in declared:
            raise ConfigError(f"{where}: ${{{name}}} is not a declared variable of this sources file; declare it in "
                              "top-level 'variables:' (secrets cannot be), or write a literal $ as %24 in a URL")
        value = declared[name]
        if value is None:
            raise ConfigError(f"{where}: ${{{name}}} is declared but not set in the environment")
        return value

    return _VAR_REF.sub(sub, node)


def load_sources(path: str | os.PathLike[str]) -> list[SourceConfig]:
    path = resolve_path(path)
    if not path.is_file():
        raise ConfigError(f"sources file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with 'sources:'")
    names = data.get("variables") or []
    if not isinstance(names, list) or not all(isinstance(n, str) and re.fullmatch(r"[A-Za-z_]\w*", n)
                                              for n in names):
        raise ConfigError(f"{path}: variables: must be a list of environment variable names")
    if secret := [n for n in names if _SECRET_NAME.search(n)]:
        raise ConfigError(f"{path}: variables: {', '.join(secret)} look(s) like a secret; a sources file's values "
                          "are sent to sites and logged, so secrets cannot be declared")
    # ${VAR} is expanded after parsing, in values only, and only for declared names (the demo site's
    # origin is only known at run time)
    declared = {n: os.environ.get(n) for n in names}
    data = {k: (v if k == "variables" else _expand_declared(v, declared, f"{path}: {k}")) for k, v in data.items()}
    try:
        return SourcesFile.model_validate(data).sources
    except ValidationError as e:
        raise ConfigError(_format_errors(e, str(path))) from None
