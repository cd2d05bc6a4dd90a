"""SPEC §7's targets, figure by figure: what is asked, what was measured, whether it holds.

Every target is reported; `--check` fails the run on the ones its mode gates:
a full run on all of them, `--quick` only on the in-process and memory targets
and on every upload being intact (the quick bodies are too small and too few for
a server throughput ratio to mean anything). A target whose figure was not
measured (a route not there yet, a server not asked for) is reported as such and
fails nothing.
"""

from __future__ import annotations

from typing import Any

from bench.report import Figure

# What a target is about; `--quick --check` gates the first three only.
QUICK_GATED = ("inprocess", "memory", "intact")
MEMORY_LIMIT_MIB = 10


def area(name: str) -> str:
    """The kind of target a ratio figure carries, from its name."""
    if name.startswith("inprocess."):
        return "inprocess"
    return name.split(".", 1)[0]  # e2e, small, download, tus, concurrency


def check_targets(figures: list[Figure], quick: bool = False,
                  skipped: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One entry per target: `ok` True/False, or None when not measured; `gated`: whether `--check` counts it."""
    by_name = {f.name: f for f in figures}
    checks: list[dict[str, Any]] = []

    def check(kind: str, target: str, name: str, value: Any, ok: bool | None) -> None:
        checks.append({
            "area": kind, "target": target, "figure": name,
            "value": round(value, 3) if isinstance(value, float) else value, "ok": ok,
            "gated": ok is not None and (not quick or kind in QUICK_GATED),
        })

    for name, figure in by_name.items():
        if figure.target is not None:
            check(area(name), f"{figure.what}: ratio to {figure.ceiling_what} >= {figure.target:g}",
                  name, figure.ratio, figure.ratio >= figure.target)
    for name in fastest_vs_aiohttp(by_name):
        figure = by_name[name]
        check("e2e", f"{figure.what}, the fastest server measured: ratio to {figure.ceiling_what} >= 1",
              name, figure.ratio, figure.ratio >= 1)
    for name, figure in by_name.items():
        if "peak_rss_growth_mib" in figure.extra:
            growth = figure.extra["peak_rss_growth_mib"]
            check("memory", f"{figure.what}: peak RSS within {MEMORY_LIMIT_MIB} MiB of a 1 MiB one (MiB)",
                  name, growth, growth <= MEMORY_LIMIT_MIB)
        if "all_intact" in figure.extra:
            check("intact", f"{figure.what}: every upload intact", name, figure.extra["intact"],
                  figure.extra["all_intact"])
    for name, note in (skipped or {}).items():
        check(area(name), f"{name}: {note}", name, None, None)
    return checks


def fastest_vs_aiohttp(by_name: dict[str, Figure]) -> list[str]:
    """Per size, the `vs_aiohttp` figure of the server under which upload-asgi went fastest."""
    best: dict[str, Figure] = {}
    for name, figure in by_name.items():
        parts = name.split(".")
        if parts[0] == "e2e" and parts[-1] == "vs_aiohttp":
            size = parts[2]
            if size not in best or figure.subject_median > best[size].subject_median:
                best[size] = figure
    return [f.name for f in best.values()]


def failed(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The gated targets that were missed: `--check` exits non-zero when there is any."""
    return [c for c in checks if c["gated"] and c["ok"] is False]


def verdict(check: dict[str, Any]) -> str:
    if check["ok"] is None:
        return "n/a   "
    if check["ok"]:
        return "ok    "
    return "MISSED" if check["gated"] else "missed"
