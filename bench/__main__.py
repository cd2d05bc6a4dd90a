"""Run every benchmark: `python -m bench [--quick] [--json PATH] [--only inprocess|server]`.

Prints one line per run on stderr, then the table on stdout, and writes every figure
to a JSON file (default bench/results/latest.json). See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import inprocess, report, server
from bench.report import Figure


def check_targets(figures: list[Figure]) -> list[dict[str, Any]]:
    """SPEC §7, figure by figure: what is asked, what was measured, whether it holds."""
    by_name = {f.name: f for f in figures}
    checks = []

    def check(target: str, name: str, value: float, ok: bool) -> None:
        checks.append({"target": target, "figure": name, "value": round(value, 3), "ok": ok})

    for name, figure in by_name.items():
        if figure.target is not None:
            check(f"{figure.what}: ratio to {figure.ceiling_what} >= {figure.target:g}",
                  name, figure.ratio, figure.ratio >= figure.target)
    large = by_name.get("e2e.large.content-length")
    if large is not None:
        growth = large.extra["peak_rss_growth_mib"]
        check("server peak RSS: large upload within 10 MiB of a 1 MiB upload (MiB)", large.name, growth, growth <= 10)
    for name, figure in by_name.items():
        if name.startswith("concurrency."):
            check(f"{figure.what}: every upload intact", name, figure.extra["all_intact"], figure.extra["all_intact"])
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small bodies and few runs (well under a minute)")
    parser.add_argument("--json", type=Path, default=report.RESULTS, help="where to write the figures (JSON)")
    parser.add_argument("--only", choices=("inprocess", "server"), help="run one half only")
    server.add_server_options(parser)
    args = parser.parse_args(argv)
    env = server.server_env(args.server_env)

    started = time.monotonic()
    load_at_start = os.getloadavg()
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="upload-asgi-bench-") as tmp:
        if args.only in (None, "inprocess"):
            figures += inprocess.run(args.quick, Path(tmp))
        if args.only in (None, "server"):
            figures += server.run(args.quick, Path(tmp), env, tuple(args.server_arg))
    checks = check_targets(figures)
    seconds = time.monotonic() - started

    print(report.table(figures))
    print()
    for c in checks:
        print(f"{'ok    ' if c['ok'] else 'MISSED'} {c['target']}: {c['value']}")
    print(f"\n{len(figures)} figures in {seconds:.0f} s; MB/s with 1 MB = 10^6 bytes; written to {args.json}")
    report.write_json(args.json, figures, checks,
                      {"quick": args.quick, "only": args.only, "seconds": round(seconds, 1),
                       "server_env": env, "server_args": args.server_arg}, load_at_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
