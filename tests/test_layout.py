"""The layout's rules, checked on the source (AST; nothing is imported for the graph):

- imports only run downward: scrapers (a library) never imports tasks, flows or benchmarks, not
  even inside a function; tasks never imports flows; shared infrastructure (tasks/core) imports no
  stage; nothing imports the benchmarks;
- no import cycles: between modules at import time, between modules counting function-local imports
  (a cycle hidden behind a local import is still two modules that cannot be understood apart), and
  between the rooms of the house (each stage, tasks/core, tasks/adapter, scrapers, flows);
- every project import names a module and a name that exist (a moved file leaves no stale import);
- ``ls tasks`` reads as the DAG;
- each data stage's fingerprint covers exactly the code its output depends on (CODE_FILES):
  editing a benchmark, the training reader, the test site or a test re-runs nothing, editing a
  declared file re-runs exactly the stages that declare it, and every project module a stage imports
  (transitively) is declared, apart from the infrastructure listed below with its reason.
"""

from __future__ import annotations

import ast
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

from scrapers.schema import REPO_ROOT

PACKAGES = ("scrapers", "tasks", "flows", "benchmarks")


# ------------------------------------------------------------------------------ the import graph
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(*roots: str) -> dict[str, Path]:
    return {_module_name(p): p for r in roots for p in sorted((REPO_ROOT / r).rglob("*.py"))
            if "__pycache__" not in p.parts}


MODULES = _sources(*PACKAGES)


@dataclass(frozen=True)
class Import:
    src: str  # importing module
    target: str  # the project module it loads
    name: str | None  # for ``from target import name``: the name taken (None: the module itself)
    local: bool  # inside a function (runs when called, not at import time)
    line: int


def _is_package(mod: str) -> bool:
    return MODULES.get(mod, Path()).name == "__init__.py"


def _imports(mod: str, path: Path, known: dict[str, Path], roots: tuple[str, ...] = PACKAGES) -> list[Import]:
    """Project imports of one module; ``from pkg import sub`` loads the submodule ``pkg.sub``."""
    out: list[Import] = []
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]

    def visit(node: ast.AST, local: bool) -> None:
        for ch in ast.iter_child_nodes(node):
            inner = local or isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(ch, ast.Import):
                for a in ch.names:
                    if a.name.split(".")[0] in roots:
                        out.append(Import(mod, a.name, None, local, ch.lineno))
            elif isinstance(ch, ast.ImportFrom):
                base = ch.module or ""
                if ch.level:  # relative: from .x import y
                    anchor = package.split(".")[: len(package.split(".")) - (ch.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                if base.split(".")[0] in roots:
                    for a in ch.names:
                        sub = f"{base}.{a.name}"
                        out.append(Import(mod, sub, None, local, ch.lineno) if sub in known
                                   else Import(mod, base, a.name, local, ch.lineno))
            visit(ch, inner)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)
    return out


EDGES = [i for m, p in MODULES.items() for i in _imports(m, p, MODULES)]


def _where(i: Import) -> str:
    return f"{MODULES[i.src].relative_to(REPO_ROOT)}:{i.line} imports {i.target}" + (f".{i.name}" if i.name else "")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def _graph(edges, key=lambda m: m) -> dict[str, set[str]]:
    g: dict[str, set[str]] = defaultdict(set)
    for i in edges:
        a, b = key(i.src), key(i.target)
        if a != b:
            g[a].add(b)
    return g


def _room(mod: str) -> str:
    """The unit a reader understands on its own: one stage (module or package), tasks/core,
    tasks/adapter, and the scrapers, flows and benchmarks folders."""
    parts = mod.split(".")
    return ".".join(parts[:2]) if parts[0] == "tasks" and len(parts) > 1 else parts[0]


def _cycle_report(cycles, edges, key=lambda m: m) -> str:
    lines = []
    for comp in cycles:
        lines.append(" <-> ".join(comp))
        lines += [f"    {_where(i)}" + (" (function-local)" if i.local else "") for i in edges
                  if key(i.src) in comp and key(i.target) in comp and key(i.src) != key(i.target)]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- layering
def test_graph_is_built_from_real_imports():
    """The walker sees the imports this file's rules depend on (a broken walker would pass them all)."""
    seen = {(i.src, i.target) for i in EDGES}
    assert ("tasks.evaluate", "tasks.train.heldout") in seen
    assert ("flows.pipeline", "tasks.train.plan") in seen
    assert any(i.src == "tasks.evaluate" and i.target == "tasks.train.stage" and i.local for i in EDGES)
    assert len(MODULES) > 60 and len(EDGES) > 150


def test_scrapers_import_nothing_from_tasks_flows_or_benchmarks():
    bad = [_where(i) for i in EDGES if i.src.startswith("scrapers") and not i.target.startswith("scrapers")]
    assert not bad, "scrapers/ is a library below the stages:\n" + "\n".join(bad)


def test_tasks_never_import_flows_or_benchmarks():
    bad = [_where(i) for i in EDGES if i.src.startswith("tasks") and i.target.split(".")[0] in ("flows", "benchmarks")]
    assert not bad, "tasks/ sits below the flows:\n" + "\n".join(bad)


def test_nothing_imports_the_benchmarks():
    bad = [_where(i) for i in EDGES if not i.src.startswith("benchmarks") and i.target.startswith("benchmarks")]
    assert not bad, "the benchmarks stay outside the product:\n" + "\n".join(bad)


def test_shared_infrastructure_imports_no_stage():
    bad = [_where(i) for i in EDGES if i.src.startswith("tasks.core")
           and i.target.startswith("tasks") and not i.target.startswith("tasks.core")]
    assert not bad, "tasks/core is the floor every stage stands on:\n" + "\n".join(bad)


def test_no_import_cycles_at_import_time():
    edges = [i for i in EDGES if not i.local]
    cycles = _cycles(_graph(edges))
    assert not cycles, "import cycles:\n" + _cycle_report(cycles, edges)


def test_no_import_cycles_behind_function_local_imports():
    cycles = _cycles(_graph(EDGES))
    assert not cycles, "cycles through function-local imports:\n" + _cycle_report(cycles, EDGES)


def test_no_cycles_between_stages_and_rooms():
    """E.g. the training package importing the evaluate stage while evaluate imports training."""
    cycles = _cycles(_graph(EDGES, _room))
    assert not cycles, "rooms that import each other:\n" + _cycle_report(cycles, EDGES, _room)


def _defined_names(path: Path) -> set[str] | None:
    """Names a module defines at top level (under if/try/with too); None if it has __getattr__."""
    names: set[str] = set()

    def visit(body) -> None:
        for n in body:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(n.name)
            elif isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                for t in n.targets if isinstance(n, ast.Assign) else [n.target]:
                    names.update(x.id for x in ast.walk(t) if isinstance(x, ast.Name))
            elif isinstance(n, ast.Import):
                names.update(a.asname or a.name.split(".")[0] for a in n.names)
            elif isinstance(n, ast.ImportFrom):
                names.update(a.asname or a.name for a in n.names)
            for field in ("body", "orelse", "finalbody", "handlers"):
                if isinstance(n, (ast.If, ast.Try, ast.With, ast.ExceptHandler)) and hasattr(n, field):
                    visit(getattr(n, field))

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return None if "__getattr__" in names else names


def test_every_project_import_resolves():
    """A module or name that moved leaves no stale import behind (function-local ones only fail
    when called, so nothing else would notice), in the product and in the tests."""
    # the tests import each other by file name (conftest, test_server: pytest puts tests/ on the path)
    tests = {p.stem: p for p in sorted((REPO_ROOT / "tests").glob("*.py"))}
    known = {**_sources(*PACKAGES), **tests}
    bad = []
    for mod, path in known.items():
        for i in _imports(mod, path, known, PACKAGES + tuple(tests)):
            if i.target not in known:
                bad.append(f"{path.relative_to(REPO_ROOT)}:{i.line}: no module {i.target}")
                continue
            names = _defined_names(known[i.target])
            if i.name not in (None, "*") and names is not None and i.name not in names:
                bad.append(f"{path.relative_to(REPO_ROOT)}:{i.line}: {i.target} defines no {i.name}")
        bad += _module_attributes_missing(path, known)
    assert not bad, "\n".join(bad)


def _module_attributes_missing(path: Path, known: dict[str, Path]) -> list[str]:
    """``import tasks.x.y as T`` / ``from tasks.x import y as T``, then ``T.name``: name must exist in y."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    alias: dict[str, str] = {}
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            alias.update({a.asname: a.name for a in n.names if a.asname and a.name in known})
        elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
            alias.update({a.asname or a.name: f"{n.module}.{a.name}" for a in n.names
                          if f"{n.module}.{a.name}" in known})
    # a name also bound otherwise somewhere in the file (a local ``kernels = []``) is not checked
    rebound = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    rebound |= {a.arg for n in ast.walk(tree) if isinstance(n, ast.arguments)
                for a in [*n.posonlyargs, *n.args, *n.kwonlyargs, n.vararg, n.kwarg] if a is not None}
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in alias \
                and n.value.id not in rebound and isinstance(n.ctx, ast.Load) and not n.attr.startswith("__"):
            mod = alias[n.value.id]
            names = _defined_names(known[mod])
            if names is not None and n.attr not in names and f"{mod}.{n.attr}" not in known:
                out.append(f"{path.relative_to(REPO_ROOT)}:{n.lineno}: {mod} defines no {n.attr}")
    return out


# ------------------------------------------------------------------------------ one definition each
def _trees(*roots: str):
    for mod, path in _sources(*roots).items():
        yield mod, path, ast.parse(path.read_text(encoding="utf-8"))


def test_stages_reach_prefect_through_the_shim():
    """``task`` comes from tasks/core/_prefect.py (a pass-through on GPU nodes without Prefect)."""
    bad = [f"{p.relative_to(REPO_ROOT)}:{n.lineno}" for m, p, t in _trees("tasks") if m != "tasks.core._prefect"
           for n in ast.walk(t) if isinstance(n, ast.ImportFrom) and n.module == "prefect"
           and any(a.name == "task" for a in n.names)]
    assert not bad, "import task from tasks.core._prefect: " + ", ".join(bad)


def test_one_retry_policy():
    """Retry settings are written once (tasks/core/_prefect.py's RetryPolicy), not as task keywords."""
    keys = {"retries", "retry_delay_seconds", "retry_condition_fn"}
    # (the config's timeouts.<stage> sections hold the numbers, the policy class applies them)
    bad = [f"{p.relative_to(REPO_ROOT)}:{n.lineno}" for m, p, t in _trees("tasks", "flows")
           if m not in ("tasks.core.config", "tasks.core._prefect")
           for n in ast.walk(t) if isinstance(n, ast.Call) and keys & {k.arg for k in n.keywords}]
    assert not bad, "use tasks.core._prefect.RetryPolicy: " + ", ".join(bad)


def test_one_repo_root():
    """``Path(__file__)...parent.parent`` once, in scrapers/schema.py; everything else imports REPO_ROOT."""
    def is_repo_root(n: ast.AST) -> bool:
        return (isinstance(n, ast.Attribute) and n.attr == "parent" and isinstance(n.value, ast.Attribute)
                and n.value.attr == "parent" and "__file__" in ast.unparse(n.value.value))

    found = [f"{p.relative_to(REPO_ROOT)}:{n.lineno}" for m, p, t in _trees(*PACKAGES, "tests")
             for n in ast.walk(t) if is_repo_root(n)]
    assert len(found) == 1 and found[0].startswith("scrapers/schema.py:"), found


def test_the_train_task_carries_the_retry_policy():
    from prefect.states import Failed

    from tasks.train.stage import TRAIN_RETRY, TrainingFailed, train
    from tasks.train.supervisor import TrainingDiverged, TrainingInterrupted

    assert (train.retries, train.retry_delay_seconds) == (TRAIN_RETRY.retries, TRAIN_RETRY.delay_s) == (2, 10)
    # the flows strip Prefect's cache from the task; the retry policy must survive that
    from flows.pipeline import nocache

    t = nocache(train)
    assert (t.retries, t.retry_condition_fn) == (train.retries, train.retry_condition_fn)
    for exc, retried in ((TrainingInterrupted("x"), True), (TrainingFailed("x"), True),
                         (TrainingDiverged("x"), False), (ValueError("x"), False)):
        assert t.retry_condition_fn(t, None, Failed(data=exc, message=repr(exc))) is retried
        # the exception is not always kept in the state: its name in the message decides then
        assert t.retry_condition_fn(t, None, Failed(message=f"Task run failed: {exc!r}")) is retried


# ------------------------------------------------------------------------------------- ls tasks
def test_ls_tasks_reads_as_the_dag():
    from flows.pipeline import ALL_STAGES

    entries = {p.name.removesuffix(".py") for p in (REPO_ROOT / "tasks").iterdir()
               if p.name not in ("__init__.py", "__pycache__")}
    assert entries == {*ALL_STAGES, "core", "adapter"}
    assert ALL_STAGES == ("scrape", "extract", "clean", "split", "mix", "tokenize", "train", "evaluate")


@pytest.mark.parametrize("stage", ["scrape", "extract", "clean", "split", "mix", "tokenize", "train", "evaluate"])
def test_each_stage_is_a_plain_function_a_task_and_a_command(stage):
    import importlib

    from prefect import Task

    m = importlib.import_module(f"tasks.{stage}")
    assert callable(getattr(m, f"run_{stage}"))
    assert isinstance(getattr(m, stage), Task) and getattr(m, stage).name == stage
    # `python -m tasks.<stage>`: a main() in the module, or a package's __main__.py
    assert hasattr(m, "main") or (REPO_ROOT / "tasks" / stage / "__main__.py").is_file()


# ---------------------------------------------------------------------------------- fingerprints
# Project modules a data stage may import without declaring them in CODE_FILES, and why:
INFRASTRUCTURE = {
    "tasks/core/config.py": "the config's schema: the values a stage uses enter its fingerprint as its config section",
    "tasks/core/manifest.py": "the fingerprint machinery itself",
    "tasks/core/_prefect.py": "orchestration only (the task decorator, the retry policy)",
    "tasks/core/cli.py": "the stages' shared command line (parses flags, loads the config; writes nothing)",
    "tasks/core/model.py": "loads the tokenizer, which enters mix's and tokenize's fingerprints by its own fingerprint",
    "scrapers/schema.py": "the scrape settings' schema (the config side of scrapers/, like tasks/core/config.py)",
    "scrapers/hashing.py": "the fingerprint function (like tasks/core/manifest.py)",
}
# scrape runs every time (conditional requests) and nothing downstream keys on its fingerprint:
# extract keys on the pages' content hash. So the crawler's code is not in any fingerprint.
NEVER_SKIPPED = {"tasks.scrape"}


def _stage_modules() -> dict[str, tuple[str, ...]]:
    """Every module under tasks/ that declares CODE_FILES -> the files it declares."""
    import importlib

    out = {}
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "CODE_FILES" for t in n.targets)
               for n in tree.body):
            out[mod] = tuple(importlib.import_module(mod).CODE_FILES)
    return out


STAGES = _stage_modules()
DATA_STAGES = {"tasks.scrape", "tasks.extract", "tasks.clean.stage", "tasks.split", "tasks.mix", "tasks.tokenize.stage"}


def test_every_data_stage_declares_its_code_and_fingerprints_with_it():
    # train declares none on purpose: a code fix must not orphan a week-long run's checkpoints
    assert set(STAGES) == DATA_STAGES
    for mod in STAGES:
        tree = ast.parse(MODULES[mod].read_text(encoding="utf-8"))
        uses = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "Stage"
                and any(k.arg == "code" and getattr(k.value, "id", None) == "CODE_FILES" for k in n.keywords)]
        assert uses, f"{mod}: no Stage(..., code=CODE_FILES)"
        for f in STAGES[mod]:
            assert (REPO_ROOT / f).is_file() and f.split("/")[0] in ("tasks", "scrapers"), f"{mod}: {f}"


def _closure(mod: str) -> set[str]:
    """Project modules ``mod`` loads, directly or not, counting function-local imports. A package's
    __init__ is followed (its re-exports) but not required, and loading ``a.b.c`` is not counted as
    running ``a.b``'s __init__ (that would make every file of a package depend on all the others)."""
    seen, todo = set(), [mod]
    by_src = defaultdict(list)
    for i in EDGES:
        by_src[i.src].append(i.target)
    while todo:
        src = todo.pop()
        if src != mod and src in MODULES and _file(src) in INFRASTRUCTURE:
            continue  # what the config schema validates with (e.g. source checks) is not the stage's code
        for t in by_src[src]:
            if t not in seen:
                seen.add(t)
                todo.append(t)
    return seen


def _file(mod: str) -> str:
    return str(MODULES[mod].relative_to(REPO_ROOT))


@pytest.mark.parametrize("mod", sorted(DATA_STAGES - NEVER_SKIPPED))
def test_code_files_cover_what_the_stage_imports(mod):
    # (an import of a module that does not exist fails test_every_project_import_resolves)
    needed = {_file(m) for m in _closure(mod) | {mod} if m in MODULES and not _is_package(m)} - set(INFRASTRUCTURE)
    declared = set(STAGES[mod])
    assert needed <= declared, f"{mod} imports code its fingerprint misses: {sorted(needed - declared)}"
    assert declared <= needed, f"{mod} declares code it does not import (needless re-runs): {sorted(declared - needed)}"


def test_scrape_is_never_skipped_by_its_fingerprint():
    """What NEVER_SKIPPED rests on: the scrape stage never consults an old manifest to skip."""
    tree = ast.parse(MODULES["tasks.scrape"].read_text(encoding="utf-8"))
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "up_to_date"]


@pytest.fixture
def repo_copy(tmp_path, monkeypatch):
    """A copy of the code the fingerprints read, with code_fingerprint pointed at it."""
    import tasks.core.manifest as manifest

    for d in ("tasks", "scrapers", "flows", "benchmarks", "tests"):
        shutil.copytree(REPO_ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(manifest, "REPO_ROOT", tmp_path)
    return tmp_path


def _fingerprints() -> dict[str, str]:
    """Each data stage's fingerprint with a fixed config and inputs: only its code varies."""
    from tasks.core.manifest import Stage

    return {mod: Stage(mod, Path("unused"), {"k": 1}, {"in": "x"}, code=files).fingerprint
            for mod, files in STAGES.items()}


def _edit(root: Path, rel: str) -> None:
    p = root / rel
    p.write_text(p.read_text(encoding="utf-8") + "\n# an edit\n", encoding="utf-8")


UNDECLARED = ["benchmarks/bench_train.py", "benchmarks/bench_prepare.py", "benchmarks/BENCH_NOTES.md",
              "tasks/tokenize/loader.py", "scrapers/testsite.py", "scrapers/fetcher.py", "tasks/train/worker.py",
              "tests/test_layout.py", "tests/conftest.py", "flows/pipeline.py"]


@pytest.mark.parametrize("rel", UNDECLARED)
def test_editing_undeclared_code_re_runs_no_data_stage(repo_copy, rel):
    """The benchmarks, the training reader, the test site, the fetcher (scrape always runs), the
    training loop, the tests and the flows are in no data stage's fingerprint."""
    before = _fingerprints()
    _edit(repo_copy, rel)
    assert _fingerprints() == before


def test_editing_a_declared_file_re_runs_exactly_the_stages_that_declare_it(repo_copy):
    declared = sorted({f for files in STAGES.values() for f in files})
    assert len(declared) > 15
    for rel in declared:
        before = _fingerprints()
        _edit(repo_copy, rel)
        after = _fingerprints()
        changed = {m for m in STAGES if after[m] != before[m]}
        assert changed == {m for m, files in STAGES.items() if rel in files}, rel
