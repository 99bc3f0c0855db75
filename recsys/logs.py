"""How much the process tells the terminal: configured once, by the command line's
`--verbose/--quiet` or the environment (`RECSYS_LOG_LEVEL`: DEBUG, INFO, WARNING, ERROR).

    configure(level_from(verbose=args.verbose, quiet=args.quiet))   # once, in the entry point
    verbose()      # True at DEBUG: the jobs also show their runtimes' own logs (Ray's)
    progress()     # the jobs' progress lines ("[stage] running ...") when INFO or lower

`configure` writes the level back to `RECSYS_LOG_LEVEL`, so processes started later (Ray
workers, the API's workers) follow it.
"""

from __future__ import annotations

import logging
import os
import sys

ENV = "RECSYS_LOG_LEVEL"
LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING,
          "ERROR": logging.ERROR}  # fmt: skip
_configured = False


def level_from(*, verbose: bool = False, quiet: bool = False) -> int:
    """`--verbose` DEBUG, `--quiet` WARNING, else `RECSYS_LOG_LEVEL`, else INFO. A value of
    RECSYS_LOG_LEVEL that names no level is a `ValueError` naming the allowed ones."""
    if verbose and quiet:
        raise ValueError("give --verbose or --quiet, not both")
    if verbose:
        return logging.DEBUG
    if quiet:
        return logging.WARNING
    return env_level()


def env_level() -> int:
    raw = os.environ.get(ENV, "").strip().upper()
    if not raw:
        return logging.INFO
    if raw not in LEVELS:
        raise ValueError(f"{ENV}={raw!r}: give one of {', '.join(LEVELS)}")
    return LEVELS[raw]


def configure(level: int) -> None:
    """Log records at `level` and above to stderr, as `LEVEL name: message` lines; our own
    INFO lines (the `recsys`, `pipelines`, ... loggers) without the prefix."""
    global _configured
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_recsys", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler._recsys = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    os.environ[ENV] = logging.getLevelName(level)
    _configured = True


def current() -> int:
    """The configured level (from the environment when `configure` was not called)."""
    if _configured:
        return logging.getLogger().level
    try:
        return env_level()
    except ValueError:
        return logging.INFO


def verbose() -> bool:
    return current() <= logging.DEBUG


def progress() -> bool:
    return current() <= logging.INFO
