"""Throughput benchmarks for upload-asgi, each against a ceiling measured in the same run.

`python -m bench` runs them all (see bench/README.md); `bench.inprocess` and
`bench.server` also run alone.
"""
