"""Which store the settings ask for: `UPLOAD_STORAGE` is `local` or `s3://<bucket>/<prefix>`."""

from __future__ import annotations

from upload_service.localstore import LocalStore
from upload_service.settings import Config
from upload_service.storage import Store

S3_SCHEME = "s3://"


def make_store(config: Config) -> Store:
    """Build the configured store; raise ConfigError if its client is not installed."""
    if not config.storage.startswith(S3_SCHEME):
        return LocalStore(config.upload_dir, config.fsync)
    from upload_service.s3store import S3Store  # the optional extra: imported only when asked for

    bucket, _, prefix = config.storage[len(S3_SCHEME):].partition("/")
    return S3Store(
        bucket,
        prefix,
        endpoint_url=config.s3_endpoint_url,
        part_size=config.s3_part_size,
        parts_in_flight=config.s3_parts_in_flight,
        sweep_after=config.s3_sweep_after,
        # Every upload may send parts_in_flight parts at once; downloads share the pool.
        max_connections=max(10, config.max_concurrent * config.s3_parts_in_flight),
    )
