"""`python -m bench --quick` runs and reports every figure.

Only that the figures are there and well formed: their values depend on the machine
and on what else runs on it, and speed is for bench/, never for a test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT

FIGURES = {
    # scenario 1: the ASGI callable in process, against write+SHA-256
    "inprocess.random.64KiB",
    "inprocess.random.1MiB",
    "inprocess.crlf_text.64KiB",
    # scenario 2: the parser alone, against SHA-256
    "parser.random",
    "parser.crlf_text",
    "parser.near_boundary",
    "parser.many_fields",
    "parser.file_and_fields",
    # scenario 3 and 5: through hypercorn, against the drain-only app, the store-only
    # app and Starlette
    *(
        f"e2e.{size}.{kind}"
        for size in ("medium", "large")
        for kind in ("content-length", "chunked", "store-only", "vs_store", "starlette", "vs_starlette")
    ),
    # scenario 4: many uploads at once, against one
    *(f"concurrency.{count}.w{workers}" for count in (8, 32) for workers in (1, 2)),
}
SUMMARY_KEYS = ("median", "min", "max")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, json.loads(Path(out).read_text())


@pytest.mark.slow
def test_every_figure_is_reported(quick_run) -> None:
    _, results = quick_run
    assert set(results["figures"]) == FIGURES
    for name, figure in results["figures"].items():
        assert figure["runs"] >= 1, name
        assert figure["bytes"] > 0, name
        for series in ("mbps", "ceiling_mbps"):
            summary = figure[series]
            assert all(summary[k] > 0 for k in SUMMARY_KEYS), (name, series)
            assert summary["min"] <= summary["median"] <= summary["max"], (name, series)
            assert len(summary["samples"]) >= 1, (name, series)
        assert figure["ratio"] > 0, name
        assert figure["what"] and figure["ceiling_what"], name


@pytest.mark.slow
def test_server_costs_and_memory_are_reported(quick_run) -> None:
    _, results = quick_run
    figures = results["figures"]
    large = figures["e2e.large.content-length"]
    for key in ("cpu_s_per_gb", "ceiling_cpu_s_per_gb", "peak_rss_mib", "peak_rss_1MiB_mib", "peak_rss_growth_mib"):
        assert isinstance(large[key], (int, float)), key
    assert large["peak_rss_mib"] > 0 and large["ceiling_cpu_s_per_gb"] > 0
    assert figures["e2e.medium.starlette"]["cpu_s_per_gb"] > 0
    assert figures["e2e.medium.store-only"]["cpu_s_per_gb"] > 0
    for name in ("e2e.medium.content-length", "e2e.large.content-length", "e2e.large.vs_starlette"):
        assert figures[name]["target"] is not None, name


@pytest.mark.slow
def test_concurrent_uploads_are_all_intact(quick_run) -> None:
    """Not a speed figure: every concurrent upload came back with the right SHA-256."""
    _, results = quick_run
    for name, figure in results["figures"].items():
        if name.startswith("concurrency."):
            done, total = map(int, figure["intact"].split("/"))
            assert done == total > 0, name
            assert figure["all_intact"] is True, name


@pytest.mark.slow
def test_table_machine_and_targets_are_reported(quick_run) -> None:
    proc, results = quick_run
    for name in FIGURES:
        assert f"| {name} |" in proc.stdout, name
    assert "1 MB = 10^6 bytes" in proc.stdout and "1 MB = 10^6 bytes" in results["unit"]
    machine = results["machine"]
    assert machine["nproc"] >= 1 and machine["cpu"] and machine["python"]
    assert len(machine["loadavg_at_start"]) == len(machine["loadavg_at_end"]) == 3
    checks = results["targets"]
    assert {c["figure"] for c in checks} >= {
        "inprocess.random.64KiB", "e2e.large.content-length", "e2e.large.vs_starlette", "concurrency.32.w1",
    }
    assert all(isinstance(c["ok"], bool) for c in checks)


@pytest.mark.slow
def test_download_bench_reports_its_figure(tmp_path) -> None:
    out = tmp_path / "download.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.download", "--quick", "--repeats", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode in (0, 1), proc.stderr[-4000:]  # 1: the ratio missed; speed is not tested here
    figure = json.loads(out.read_text())["download"]
    assert figure["runs"] == 1 and figure["bytes"] == 64 * 1024 * 1024 and figure["intact"] is True
    assert figure["target"] == 0.9 and figure["ratio"] > 0
    assert figure["peak_rss_mib"] > 0 and "peak_rss_growth_mib" in figure
    assert "download.64MiB" in proc.stdout
