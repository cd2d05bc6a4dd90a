"""Which store the settings ask for: `UPLOAD_STORAGE` is `local` or `s3://<bucket>/<prefix>`."""

from __future__ import annotations

from upload_service.errors import ConfigError
from upload_service.localstore import LocalStore
from upload_service.settings import Config
from upload_service.storage import ResumableStore, Store

S3_SCHEME = "s3://"
S3_MAX_PARTS = 10_000  # parts per multipart upload (S3's limit)


def make_store(config: Config) -> Store:
    """Build the configured store; raise ConfigError if its client is not installed."""
    if not config.storage.startswith(S3_SCHEME):
        return LocalStore(config.upload_dir, config.fsync)
    if config.max_file_size > S3_MAX_PARTS * config.s3_part_size:
        raise ConfigError(
            f"UPLOAD_S3_PART_SIZE: {config.s3_part_size} bytes a part allow files up to "
            f"{S3_MAX_PARTS * config.s3_part_size} bytes (S3 takes {S3_MAX_PARTS} parts), "
            f"less than UPLOAD_MAX_FILE_SIZE {config.max_file_size}: raise the part size"
        )
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


def make_resumable_store(config: Config, store: Store) -> ResumableStore:
    """Resumable uploads where the files go: staged in UPLOAD_DIR, or in the bucket itself."""
    if not config.storage.startswith(S3_SCHEME):
        from upload_service.localresumable import LocalResumableStore

        return LocalResumableStore(config.upload_dir, config.fsync)
    from upload_service.s3resumable import S3ResumableStore

    # A writer's lease outlives any pause its request may take (the idle timeout) twice over.
    lease = max(5.0, 2 * config.idle_timeout)
    return S3ResumableStore(store, lease, config.resumable_expiry)  # type: ignore[arg-type]
