"""Run every benchmark: `python -m bench [--quick] [--check] [--servers LIST] [--only PART] [--json PATH]`.

Prints one line per run on stderr, then the table and the SPEC §7 targets on stdout,
and writes every figure to a JSON file (default bench/results/latest.json). With
`--check`, exits 1 when a target is missed (`--quick --check`: the in-process and
memory targets and intact uploads only; see bench/check.py). See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from bench import inprocess, report, resources, server, small
from bench.check import check_targets, failed, verdict
from bench.report import Figure

PARTS = ("inprocess", "server", "small", "resources")


def parts_option(text: str) -> tuple[str, ...]:
    chosen = tuple(p.strip() for p in text.split(",") if p.strip())
    if not chosen or any(p not in PARTS for p in chosen):
        raise argparse.ArgumentTypeError(f"parts are a comma-separated list of {', '.join(PARTS)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small bodies and few runs (about a minute)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a SPEC §7 target is missed (with --quick: in-process and memory only)")
    parser.add_argument("--json", type=Path, default=report.RESULTS, help="where to write the figures (JSON)")
    parser.add_argument("--only", type=parts_option, default=PARTS, metavar="PARTS",
                        help=f"run only these parts, comma-separated: {','.join(PARTS)}")
    server.add_server_options(parser)
    args = parser.parse_args(argv)
    env = server.server_env(args.server_env)
    hypercorn_args = tuple(args.server_arg)

    started = time.monotonic()
    load_at_start = os.getloadavg()
    figures: list[Figure] = []
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="upload-asgi-bench-") as tmp:
        workdir = Path(tmp)
        if "inprocess" in args.only:
            figures += inprocess.run(args.quick, workdir)
        if "server" in args.only:
            figures += server.run(args.quick, workdir, env, hypercorn_args, args.servers)
        if "small" in args.only:
            figures += small.run(args.quick, workdir, env, hypercorn_args, args.servers)
        if "resources" in args.only:
            measured, skipped = resources.run(args.quick, workdir, env, hypercorn_args)
            figures += measured
    checks = check_targets(figures, args.quick, skipped)
    seconds = time.monotonic() - started

    print(report.table(figures))
    print()
    for c in checks:
        print(f"{verdict(c)} {c['target']}: {c['value']}")
    missed = failed(checks)
    gate = "in-process, memory and intact targets only (--quick)" if args.quick else "every target"
    print(f"\n{len(figures)} figures in {seconds:.0f} s; MB/s with 1 MB = 10^6 bytes; written to {args.json}")
    print(f"load average at start {load_at_start}, at end {os.getloadavg()}")
    if args.check:
        print(f"--check ({gate}): {len(missed)} missed")
    report.write_json(args.json, figures, checks,
                      {"quick": args.quick, "check": args.check, "only": list(args.only),
                       "servers": list(args.servers), "seconds": round(seconds, 1), "server_env": env,
                       "server_args": args.server_arg, "skipped": skipped}, load_at_start)
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
