"""``kplane`` command line."""

from __future__ import annotations

import argparse
import sys

from kplane import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kplane")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("version", help="print the kplane version")
    args = parser.parse_args(argv)
    if args.cmd == "version":
        print(__version__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
