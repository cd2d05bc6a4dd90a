"""`upload-asgi` and `python -m upload_asgi`: run hypercorn with the README's defaults.

The command checks the settings and that a local upload dir can be made and committed into
(a bad one stops it here, with exit status 2 and the variable named: hypercorn itself exits 0
when a worker fails startup), puts `--dir` in
`UPLOAD_DIR`, and then becomes `python -m hypercorn ... upload_asgi:app` (exec: same
process id, so a supervisor signals hypercorn's main process directly). Options it does
not know are handed to hypercorn as they are (`--certfile`, `--access-logfile -`...).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from upload_service.errors import ConfigError
from upload_service.localstore import LocalStore, check_commits_work
from upload_service.settings import Config, describe
from upload_service.stores import S3_SCHEME

APP = "upload_asgi:app"
DEFAULT_BIND = "127.0.0.1:8000"
# hypercorn's own default (3 s) cuts off nearly every upload in flight at a restart;
# 60 s stays under systemd's default stop timeout (90 s). README "Shutdown".
DEFAULT_GRACEFUL_TIMEOUT = 60


def build_parser() -> argparse.ArgumentParser:
    settings = describe()
    width = max(len(variable) for variable, _, _ in settings)
    rows = "\n".join(f"  {variable:<{width}} {default:<7} {text}" for variable, default, text in settings)
    parser = argparse.ArgumentParser(
        prog="upload-asgi",
        allow_abbrev=False,  # an abbreviated hypercorn option must reach hypercorn
        description="Serve upload-asgi with hypercorn (it runs `python -m hypercorn ... upload_asgi:app`).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "settings (environment variables read by the app; default, meaning):\n"
            f"{rows}\n\n"
            "Any other option is passed to hypercorn unchanged (see `hypercorn --help`),\n"
            "e.g. --certfile cert.pem --keyfile key.pem for HTTPS and HTTP/2,\n"
            "--access-logfile - for an access log."
        ),
    )
    parser.add_argument("--bind", "-b", action="append", metavar="HOST:PORT",
                        help=f"address to listen on, repeatable (default {DEFAULT_BIND})")
    parser.add_argument("--workers", "-w", type=int, default=1, metavar="N",
                        help="worker processes (default 1); /metrics sums them all")
    parser.add_argument("--root-path", default="", metavar="PATH",
                        help="the prefix the app is mounted under, which the proxy keeps in the path, e.g. /uploads (default none)")
    parser.add_argument("--dir", metavar="PATH", help="upload directory: sets UPLOAD_DIR (default ./uploads)")
    parser.add_argument("--graceful-timeout", type=int, default=DEFAULT_GRACEFUL_TIMEOUT, metavar="SECONDS",
                        help=f"how long uploads in flight may take to finish at SIGTERM, whole seconds "
                             f"as hypercorn takes them (default {DEFAULT_GRACEFUL_TIMEOUT}; hypercorn's own is 3)")
    return parser


def hypercorn_argv(args: argparse.Namespace, passthrough: Sequence[str]) -> list[str]:
    argv = [sys.executable, "-m", "hypercorn"]
    for bind in args.bind or [DEFAULT_BIND]:
        argv += ["--bind", bind]
    argv += ["--workers", str(args.workers), "--graceful-timeout", str(args.graceful_timeout)]
    if args.root_path:
        argv += ["--root-path", args.root_path]
    return [*argv, *passthrough, APP]


def check_upload_dir(config: Config) -> None:
    """What each worker's startup checks of a local store (the dirs made, a commit works), said here."""
    if config.storage.startswith(S3_SCHEME):
        return
    store = LocalStore(config.upload_dir, config.fsync)
    try:
        store.partial_dir.mkdir(parents=True, exist_ok=True)
        check_commits_work(store.upload_dir, store.partial_dir)
    except OSError as exc:
        raise ConfigError(store.describe_problem(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, passthrough = parser.parse_known_args(argv)
    if args.workers < 0:
        parser.error("--workers must be 0 (serve in this process) or more")
    if args.graceful_timeout < 0:
        parser.error("--graceful-timeout must be 0 or more seconds")
    if args.dir is not None:
        os.environ["UPLOAD_DIR"] = args.dir
    try:
        check_upload_dir(Config.from_env())
    except ConfigError as exc:
        print(f"upload-asgi: {exc}", file=sys.stderr)
        return 2
    command = hypercorn_argv(args, passthrough)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    raise SystemExit(main())
