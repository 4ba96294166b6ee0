"""``kplane`` command line: ``up``, ``server``, ``version``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from kplane import __version__


def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=Path(".kplane"), help="state, PKI and kubeconfigs")
    p.add_argument("--apiserver-port", type=int, default=6443)
    p.add_argument("--bind-address", default="0.0.0.0")
    p.add_argument("--advertise-address", default="127.0.0.1")
    p.add_argument("--tls-san", action="append", default=[], help="extra apiserver certificate SANs")
    p.add_argument("--anonymous-auth", choices=["true", "false"], default="true")
    p.add_argument("--token-auth-file", type=Path, default=None, help="static tokens (CSV token,user,uid,groups)")
    p.add_argument("-v", "--verbose", action="store_true")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kplane")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("version", help="print the kplane version")
    _server_args(sub.add_parser("up", help="run the control plane in the foreground (all-in-one)"))
    _server_args(sub.add_parser("server", help="run only the control plane"))
    args = parser.parse_args(argv)
    if args.cmd == "version":
        print(__version__)
        return 0
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from kplane.controlplane import Config, run_forever

    cfg = Config(data_dir=args.data_dir.resolve(), port=args.apiserver_port, bind_address=args.bind_address,
                 advertise_address=args.advertise_address, extra_sans=args.tls_san,
                 anonymous=args.anonymous_auth == "true", token_file=args.token_auth_file)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_forever(cfg, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
