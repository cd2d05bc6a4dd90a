"""The upload app mounted under /files by hypercorn's DispatcherMiddleware (for the page tests).

Served as `hypercorn mounted_app:app` with tests/ on PYTHONPATH; configured from the
environment like `upload_asgi:app`.
"""

from hypercorn.middleware import DispatcherMiddleware

import upload_asgi

PREFIX = "/files"

app = DispatcherMiddleware({PREFIX: upload_asgi.create_app()})
