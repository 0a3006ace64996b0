"""``d2a``: the command line.

    d2a run   [--config configs/demo.yaml] [--force STAGE ...] [section.key=value ...]
                                           the whole DAG as a Prefect flow run (ephemeral API, no server)
    d2a stage NAME --config FILE [--force] [section.key=value ...]
                                           one stage on the previous stage's artifacts, no Prefect at all
    d2a plan  [--config configs/demo.yaml] [--json] [section.key=value ...]
                                           what the run will cost: sources, tokens per category, steps,
                                           device-hours, checkpoints, disk (saved as <data root>/plan.json, .md)
    d2a generate --run DIR --prompt TEXT   answer with a trained adapter
    d2a deploy --config FILE [--config ...] [--no-schedule]
                                           work pools, deployments and automations against $PREFECT_API_URL
    d2a server [--host 127.0.0.1] [--port 4200] [--config configs/demo.yaml ...]
                                           a Prefect server + UI, the deployments, one process worker per pool
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from tasks.core.config import REPO_ROOT  # noqa: E402

STAGES = ("scrape", "extract", "clean", "split", "mix", "tokenize", "train", "evaluate")


def _prefect_env() -> None:
    """Prefect reads these at import: keep its SQLite database under the data folder and forward
    the stages' own loggers to the flow run's logs. Secrets come from the environment or .env."""
    os.environ.setdefault("PREFECT_HOME", str(REPO_ROOT / "data" / "prefect"))
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks,scrapers,flows")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    try:
        from dotenv import load_dotenv

        load_dotenv(REPO_ROOT / ".env", override=False)
    except ImportError:
        pass


def _run_stage(name: str, config: str, overrides: list[str], force: bool = False) -> dict:
    import importlib

    from scrapers.testsite import demo_site_env
    from tasks.core.config import load_config

    cfg = load_config(config, overrides)
    if force:
        from flows.pipeline import invalidate

        invalidate(cfg, {name})
    fn = getattr(importlib.import_module(f"tasks.{name}"), f"run_{name}")
    if name == "scrape":
        with demo_site_env(cfg.demo_site):
            return fn(cfg)
    return fn(cfg)


def main(argv: list[str] | None = None) -> int:
    _prefect_env()
    ap = argparse.ArgumentParser(prog="d2a", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the whole data-to-adapter flow")
    r.add_argument("--config", default="configs/demo.yaml")
    r.add_argument("--force", action="append", default=[], metavar="STAGE",
                   choices=("all", "prepare", *STAGES),
                   help="re-run STAGE even if up to date (repeatable; 'all', 'prepare' or a stage name)")
    r.add_argument("--verify", action="store_true", help="check every output's sha256 before it is skipped or read")
    r.add_argument("overrides", nargs="*", help="section.key=value")
    s = sub.add_parser("stage", help="run one stage on the previous stage's artifacts, without Prefect")
    s.add_argument("name", choices=STAGES)
    s.add_argument("--config", required=True)
    s.add_argument("--force", action="store_true", help="re-run the stage even if it is up to date")
    s.add_argument("--verify", action="store_true", help="check every output's sha256 before it is skipped or read")
    s.add_argument("overrides", nargs="*", help="section.key=value")
    pl = sub.add_parser("plan", help="what the run will cost, before it runs (also after a scrape: real counts)")
    pl.add_argument("--config", default="configs/demo.yaml")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON instead of Markdown")
    pl.add_argument("overrides", nargs="*", help="section.key=value")
    dp = sub.add_parser("deploy", help="create the work pools, register the deployments and the notification "
                                       "automations against $PREFECT_API_URL")
    dp.add_argument("--config", action="append", required=True, help="pipeline config (repeatable)")
    dp.add_argument("--no-schedule", action="store_true", help="register rescrape-and-retrain without its cron")
    v = sub.add_parser("server", help="a Prefect server + UI, the deployments and a process worker per pool "
                                      "(Ctrl-C stops)")
    v.add_argument("--host", default=os.environ.get("D2A_SERVER_HOST", "127.0.0.1"),
                   help="address to listen on (default 127.0.0.1: this machine only; any other needs "
                        "PREFECT_SERVER_API_AUTH_STRING)")
    v.add_argument("--port", type=int, default=int(os.environ.get("D2A_SERVER_PORT", "4200")),
                   help="API and UI port (default 4200, or $D2A_SERVER_PORT)")
    v.add_argument("--config", action="append", help="pipeline config whose deployments to serve (repeatable; "
                                                     "default configs/demo.yaml)")
    v.add_argument("--limit", type=int, default=None, help="most flow runs at once per worker")
    v.add_argument("--no-schedule", action="store_true", help="register rescrape-and-retrain without its cron")
    g = sub.add_parser("generate", help="answer a prompt with a trained adapter")
    g.add_argument("rest", nargs=argparse.REMAINDER)
    raw = sys.argv[1:] if argv is None else list(argv)
    if raw[:1] == ["generate"]:  # everything after it belongs to tasks.adapter.generate (its options start with --)
        from tasks.adapter.generate import main as gen_main

        gen_main(raw[1:])
        return 0
    # overrides (section.key=value) may come before or after options
    a, extra = ap.parse_known_args(raw)
    if a.cmd == "deploy":
        if extra:
            ap.error(f"unrecognized arguments: {' '.join(extra)}")
        from flows.deployments import deploy_config
        from tasks.core.config import ConfigError

        try:
            for c in a.config:
                out = deploy_config(c, not a.no_schedule)
                print(f"{c}: pools created {out['pools_created'] or 'none (existing)'}; "
                      f"{len(out['deployments'])} deployments; automations {out['automations'] or 'none'}")
        except (ConfigError, ValueError) as e:
            print(f"d2a deploy: {e}", file=sys.stderr)
            return 2
        return 0
    if a.cmd == "server":
        if extra:
            ap.error(f"unrecognized arguments: {' '.join(extra)}")
        from flows.server import run_server

        return run_server(a.host, a.port, a.config, a.limit, not a.no_schedule)
    bad = [x for x in extra if "=" not in x or x.startswith("-")]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)}")
    a.overrides = [*a.overrides, *extra]
    from tasks.core.cli import USER_ERRORS, user_error_exit
    from tasks.core.manifest import set_verify

    set_verify(getattr(a, "verify", False))  # through the environment: also reaches worker processes
    try:
        if a.cmd == "plan":
            from flows.plan import PLAN_JSON, PLAN_MD, plan_markdown, run_plan
            from tasks.core.config import load_config

            cfg = load_config(a.config, a.overrides)
            p = run_plan(cfg)
            print(json.dumps(p, indent=2, default=str) if a.json else plan_markdown(p))
            print(f"saved: {cfg.root / PLAN_JSON}, {cfg.root / PLAN_MD}", file=sys.stderr)
            return 0
        if a.cmd == "stage":
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
            m = _run_stage(a.name, a.config, a.overrides, a.force)
            print(json.dumps({"stage": a.name, "counts": m.get("counts")}, indent=2, default=str))
            return 0
        from flows.pipeline import data_to_adapter

        summary = data_to_adapter(config=a.config, overrides=a.overrides, force=a.force or None)
    except USER_ERRORS as e:
        return user_error_exit(e)
    print()
    print(f"data-to-adapter finished in {summary['wall_s']:.0f}s")
    print(f"  adapter:     {summary['adapter']}")
    print(f"  eval report: {summary['eval_report']}")
    for k, v in summary["dashboards"].items():
        print(f"  dashboard:   {v}  ({k})")
    ov = summary["overall_loss"]
    print(f"  held-out loss: base {ov['base']:.4f} -> adapter {ov['adapter']:.4f}")
    print(f"  sample ({summary['sample']['prompt']}):\n    {summary['sample']['adapter'][:400]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
