from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Iterator

import httpx
import pytest

import upload_asgi
from support import Server
from upload_service.localstore import LocalStore

if TYPE_CHECKING:
    from s3server import SeaweedFS


@pytest.fixture
def upload_dir(tmp_path: Path) -> Path:
    return tmp_path / "uploads"


@pytest.fixture
def store(upload_dir: Path) -> LocalStore:
    """The local backend on `upload_dir`, prepared as at startup."""
    store = LocalStore(upload_dir)
    store.prepare()
    return store


@pytest.fixture
def partial_dir(store: LocalStore) -> Path:
    return store.partial_dir


@pytest.fixture
def config(upload_dir: Path) -> upload_asgi.Config:
    return upload_asgi.Config(upload_dir=upload_dir)


@pytest.fixture
def app(config: upload_asgi.Config) -> upload_asgi.UploadApp:
    return upload_asgi.create_app(config)


@pytest.fixture
async def client(app: upload_asgi.UploadApp) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@pytest.fixture
def server(upload_dir: Path) -> Iterator[Server]:
    """A real `hypercorn upload_asgi:app` on a free port, with UPLOAD_DIR set."""
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0"}) as running:
        yield running


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator["SeaweedFS"]:
    """One SeaweedFS (`weed mini`) for the session, on free ports; tests use their own prefixes."""
    from s3server import SeaweedFS

    with SeaweedFS(tmp_path_factory.mktemp("seaweedfs") / "data") as running:
        yield running
