"""Byte units (binary: 1M = 2**20 bytes, as UPLOAD_* sizes are read)."""

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
