"""Command line: `agml unlearn | score | eval | bench` (also `python -m agml`).

User errors (AgmlError) print one line and exit with code 2; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from agml.errors import AgmlError

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agml", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


# Each entry adds one subparser and sets `handler` (a function taking the parsed args).
_SUBCOMMANDS: list = []


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except AgmlError as err:
        if args.debug:
            traceback.print_exc()
        print(f"agml {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"agml {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
