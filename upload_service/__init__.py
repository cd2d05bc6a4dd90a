"""upload-asgi's concerns, one module each; `upload_asgi` is the front door that ties them."""
