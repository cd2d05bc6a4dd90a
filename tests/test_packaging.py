"""The built wheel carries everything a plain `pip install` needs, the page included."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from support import ROOT


@pytest.mark.slow
def test_wheel_contains_the_modules_and_the_page(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("upload_asgi-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"upload_asgi.py", "targets.py", "upload_service/page.html", "upload_service/storage.py"} <= names
    page = zipfile.ZipFile(wheel).read("upload_service/page.html").decode()
    assert "__SETTINGS__" in page and "__ROOT__" in page
