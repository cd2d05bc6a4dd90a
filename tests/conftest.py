from __future__ import annotations

import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator

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


@pytest.fixture
def backend_server(backend: Any, upload_dir: Path) -> Iterator[Server]:
    """`server` on `backend` (tests/backends.py): a real hypercorn storing there."""
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0", **backend.server_env()}) as running:
        yield running


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator["SeaweedFS"]:
    """One SeaweedFS (`weed mini`) for the session, on free ports; tests use their own prefixes."""
    from s3server import SeaweedFS

    with SeaweedFS(tmp_path_factory.mktemp("seaweedfs") / "data") as running:
        yield running


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, upload_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Each storage backend in turn (tests/backends.py): a behaviour test runs on both."""
    from backends import LocalBackend

    if request.param == "local":
        return LocalBackend(upload_dir)
    return request.getfixturevalue("bucket")


@pytest.fixture
def bucket(seaweedfs: "SeaweedFS", upload_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The S3 backend: SeaweedFS's bucket under a prefix of this test's own (tests/backends.py)."""
    from backends import S3Backend, use_seaweedfs

    use_seaweedfs(seaweedfs, monkeypatch)
    return S3Backend(seaweedfs, upload_dir, f"t/{uuid.uuid4().hex[:12]}")


@pytest.fixture
def backend_settings() -> dict[str, Any]:
    """Settings of the apps on `backend` (a module overrides it: e.g. fsync off for many uploads)."""
    return {}


@pytest.fixture
async def make_backend_app(backend: Any, backend_settings: dict[str, Any]) -> AsyncIterator[Any]:
    """`make(on_upload, before_upload, **settings)`: an app on `backend`; closed after the test."""
    from backends import close_app

    apps: list[upload_asgi.UploadApp] = []

    def make(on_upload: Any = None, before_upload: Any = None, **settings: Any) -> upload_asgi.UploadApp:
        config = backend.config(**{**backend_settings, **settings})
        apps.append(upload_asgi.create_app(config, on_upload=on_upload, before_upload=before_upload))
        return apps[-1]

    yield make
    for app in apps:
        await close_app(app)


@pytest.fixture
def backend_app(make_backend_app: Any) -> upload_asgi.UploadApp:
    """The app on `backend`, with `backend_settings`."""
    return make_backend_app()


@pytest.fixture
async def backend_client(backend_app: upload_asgi.UploadApp) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=backend_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60) as client:
        yield client
