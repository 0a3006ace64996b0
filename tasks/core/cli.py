"""The command line every stage shares: ``python -m tasks.<stage> --config C [--verify] [key=value ...]``.

One parser, one logging set-up and one config load, so the stages' ``main()`` hold only what is
their own (an extra flag, the summary line they print).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable

from scrapers.schema import ConfigError
from tasks.core.config import PipelineConfig, load_config
from tasks.core.manifest import DamagedOutput, LockHeld, MissingOutput, set_verify
from tasks.core.model import BaseRevisionMismatch

# What a user can fix from the message alone (a bad key, a stage not run yet, a damaged or locked
# output, an unpinned base): printed as one line, no traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, BaseRevisionMismatch, MissingOutput, DamagedOutput,
                                                 LockHeld)


def user_error_exit(e: BaseException) -> int:
    """Print a user error as one line on stderr; return the exit status (2: config, 3: the data)."""
    if isinstance(e, ConfigError):
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(f"error: {e}", file=sys.stderr)
    return 3


def clean_errors(main: Callable[..., object]) -> Callable[..., object]:
    """Wrap a command's main(): user errors exit with one line and status 2 or 3 (see ``user_error_exit``)."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as e:
            sys.exit(user_error_exit(e))

    return wrapper


def stage_args(description: str, argv: list[str] | None = None, *, verify: bool = True,
               extra: Callable[[argparse.ArgumentParser], None] | None = None
               ) -> tuple[PipelineConfig, argparse.Namespace]:
    """Parse a stage's command line and return (config with the overrides applied, the parsed args).

    ``verify``: the stage reads or skips on earlier outputs, so offer ``--verify`` (sha256 of every
    output checked first). ``extra`` adds the stage's own flags before the ``overrides`` positional."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", required=True, help="pipeline YAML (configs/demo.yaml, configs/mistral-small-24b.yaml)")
    if verify:
        ap.add_argument("--verify", action="store_true", help="check sha256 of outputs before skipping or reading them")
    if extra is not None:
        extra(ap)
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    args = ap.parse_args(argv)
    if verify:
        set_verify(args.verify)
    # force: importing prefect already configured the root logger at WARNING, which would hide progress
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    return load_config(args.config, args.overrides), args
