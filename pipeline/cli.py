"""Command-line conventions shared by ``python -m pipeline`` and ``python -m trainer``.

Every command takes ``--config`` and ``--set``, writes its resolved config and the code version
into its output folder, and turns expected failures (bad input, bad config) into one line on
stderr and a non-zero exit instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.atomic_files import DISK_ERRORS, write_json, write_text
from pipeline.config import ConfigError, dump_toml, read_toml


class UserError(RuntimeError):
    """A problem the user can fix (missing input, mismatched shards, ...): one line, exit 2."""


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/demo.toml", help="experiment TOML file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set proposals.top_k=10",
    )


def code_version() -> str:
    """Package version plus the git commit (and '-dirty') when run from a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return f"{__version__}+{sha}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return __version__


def record_run(
    out_dir: str | Path, resolved: dict[str, Any], argv: list[str] | None = None
) -> None:
    """Write ``config.toml`` (the fully resolved config) and ``version.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.toml", dump_toml(resolved))
    info = {"version": code_version(), "argv": argv if argv is not None else sys.argv}
    write_json(out / "version.json", info)


def raw_config(args: argparse.Namespace) -> dict[str, Any]:
    return read_toml(args.config, args.overrides)


def main(prog: str, commands: dict[str, str], argv: list[str] | None = None) -> int:
    """Dispatch ``prog COMMAND ...`` to the module's ``add_arguments(parser)`` and ``run(args)``."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog=prog)
    sub = parser.add_subparsers(dest="command", required=True)
    # Import only the chosen command's module (each pulls in heavy libraries: torch, ray, ...);
    # all of them only when listing commands.
    chosen = [c for c in commands if c in argv[:1]]
    for name, module_name in commands.items():
        if chosen and name not in chosen:
            sub.add_parser(name)
            continue
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip().splitlines()
        p = sub.add_parser(
            name,
            help=doc[0] if doc else None,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_common(p)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    args = parser.parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except (UserError, ConfigError, FileNotFoundError) as e:
        print(f"{prog} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # A full disk or a read-only folder is the user's to fix: one line naming the path.
        if e.errno not in DISK_ERRORS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prog} {args.command}: error: {where}{DISK_ERRORS[e.errno]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # A training loop says what it kept and how to continue (trainer/engine/loop.py).
        detail = f": {e}" if str(e) else ""
        print(f"{prog} {args.command}: interrupted{detail}", file=sys.stderr)
        return 130
