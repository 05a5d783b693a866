"""The ``metahistoseg`` command line: one subcommand per submodule, mirroring the GUI.

Each submodule named in :data:`SUBCOMMANDS` exposes ``register(subparsers)``, which adds its parser and sets
``func`` (``func(args: argparse.Namespace) -> int``) as the parser default. Submodules keep their module-level
imports light (numpy at most) and import torch and friends inside ``func``, so that ``metahistoseg --help`` and
``metahistoseg inspect`` start quickly.

Errors: a ``ValueError`` or ``OSError`` raised by a command is printed as one line,
``metahistoseg: error: <message>``, on stderr and the exit code is 2; any other exception (a bug, or running out
of memory) is printed as one line too, ``metahistoseg: error: unexpected <Type>: <message> ...``, with exit code
1. ``--debug`` shows the traceback instead. No command ever ends with a traceback without ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

from .. import __version__

PROG = "metahistoseg"
SUBCOMMANDS: tuple[str, ...] = ("inspect", "train", "evaluate", "adapt", "adapt_mitosis", "predict")
"""Submodules of :mod:`napari_metahistoseg.cli` that provide subcommands, in ``--help`` order."""

EXIT_OK = 0
EXIT_ERROR = 2  # bad input (as argparse uses for usage errors)
EXIT_INTERNAL = 1  # an unexpected exception: a bug (please report it with --debug's traceback) or no memory left
EXIT_INTERRUPTED = 130

log = logging.getLogger(__name__)


def int_list(spec: str, option: str, form: str) -> tuple[int, ...]:
    """Comma-separated non-negative integers of a command-line option, e.g. ``int_list("3,4", "--origin",
    "ROW,COL")``: as many as ``form`` names; ValueError naming the option and the expected form otherwise."""
    n = len(form.split(","))
    try:
        vals = tuple(int(v) for v in spec.split(","))
    except ValueError:
        vals = ()
    if len(vals) != n:
        count = {1: "one integer", 2: "two integers", 3: "three integers", 4: "four integers"}.get(n, f"{n} integers")
        raise ValueError(f"{option} must be {form} ({count}), got {spec!r}")
    if min(vals) < 0:
        raise ValueError(f"{option} must be non-negative, got {spec!r}")
    return vals


def _load_subcommand_modules() -> list[ModuleType]:
    """Import the subcommand modules that exist; one that is not written yet is skipped."""
    modules = []
    for name in SUBCOMMANDS:
        full = f"{__name__}.{name}"
        try:
            modules.append(importlib.import_module(full))
        except ModuleNotFoundError as e:
            if e.name != full:  # the module exists but one of its own imports is missing: a real error
                raise
            log.debug("subcommand module %s not present; skipped", full)
    return modules


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand registered."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Few-shot segmentation for histopathology (the command-line side of the napari plugin).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO level) to stderr")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for module in _load_subcommand_modules():
        module.register(subparsers)
    return parser


def _own_or_error(record: logging.LogRecord) -> bool:
    """Our own records, and only the errors of other libraries: a library's warning about a file that we then
    reject (tifffile's "invalid offset to first page") would be a second line before our one-line error."""
    return record.levelno >= logging.ERROR or record.name.split(".")[0] == __name__.split(".")[0]


def _configure_logging(args: argparse.Namespace) -> None:
    """Warnings to stderr (progress with ``--verbose``, everything with ``--debug``); other libraries' warnings
    and info (tifffile, zarr, ...) only with ``--verbose`` or ``--debug``."""
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    if not (args.debug or args.verbose):
        handler.addFilter(_own_or_error)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", handlers=[handler])


def error(message: str, code: int = EXIT_ERROR) -> int:
    """Print ``metahistoseg: error: <message>`` (one line) to stderr and return ``code``."""
    one_line = " ".join(str(message).split())
    print(f"{PROG}: error: {one_line}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (2) and --help/--version (0)
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    _configure_logging(args)
    try:
        code = args.func(args)
    except (ValueError, OSError) as e:
        if args.debug:
            raise
        return error(str(e) or type(e).__name__)
    except KeyboardInterrupt:
        if args.debug:
            raise
        error("interrupted")
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        if args.debug:
            raise
        return error(f"unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback and please report "
                     "it)", EXIT_INTERNAL)
    return EXIT_OK if code is None else int(code)
