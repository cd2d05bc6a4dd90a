"""The shortest path through the product: one upload in process and one through hypercorn."""

import hashlib

from support import assert_stored


async def test_upload_in_process(client, upload_dir):
    data = b"hello\r\nworld"
    reply = await client.post("/upload", files={"file": ("hello.txt", data, "text/plain")})
    assert reply.status_code == 201
    record = reply.json()
    assert record["filename"] == "hello.txt"
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert_stored(upload_dir, record, data)


def test_upload_through_hypercorn(server, upload_dir):
    data = bytes(range(256)) * 100
    with server.client() as http:
        reply = http.post("/upload", files={"file": ("bytes.bin", data)})
    assert reply.status_code == 201, reply.text
    assert_stored(upload_dir, reply.json(), data)
