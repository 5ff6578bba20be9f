"""The lean HTTP/1.1 client of the vLLM engine's non-streamed requests (gateway/engines/http1.py),
against real sockets: small asyncio servers on loopback that answer, refuse, hang, trickle or hang
up. Its errors must be aiohttp's types, which the engine's retry and failover code catches."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from gateway.engines.http1 import PostPool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b'{"ok":true}'


def pool(**kwargs: float) -> PostPool:
    settings = {"limit": 4, "keepalive_s": 4.0, "connect_timeout_s": 2.0, "read_timeout_s": 2.0} | kwargs
    return PostPool(**settings)  # type: ignore[arg-type]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    return head + await reader.readexactly(length)


async def serve(handler: Handler, test: Callable[[str], Awaitable[None]]) -> None:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await test(f"http://127.0.0.1:{port}/v1/chat/completions")
    finally:
        server.close()


def test_answers_keep_their_connection_and_chunked_bodies_are_decoded() -> None:
    seen: list[bytes] = []
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while not reader.at_eof():
            try:
                seen.append(await read_request(reader))
            except asyncio.IncompleteReadError:
                break
            if len(seen) % 2:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(OK), OK))
            else:  # chunked, and an error status: both passed on as they are
                writer.write(b"HTTP/1.1 503 Busy\r\ntransfer-encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n")
            await writer.drain()
        writer.close()

    async def test(url: str) -> None:
        client = pool()
        assert await client.post(url, b'{"x":1}', 5) == (200, OK)
        assert await client.post(url, b'{"x":2}', 5) == (503, b'{"a":1}')
        assert await client.post(url, b'{"x":3}', 5) == (200, OK)
        assert client.opened == 1 and connections == 1
        client.close()

    asyncio.run(serve(handler, test))
    assert seen[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n") and seen[0].endswith(b'\r\n\r\n{"x":1}')
    assert b"content-type: application/json\r\n" in seen[0]


def test_an_expired_idle_connection_is_not_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(OK), OK))

    async def test(url: str) -> None:
        client = pool(keepalive_s=0.05)
        await client.post(url, b"{}", 5)
        await asyncio.sleep(0.2)
        await client.post(url, b"{}", 5)
        assert client.opened == 2
        client.close()

    asyncio.run(serve(handler, test))


def test_refused_connection_is_aiohttps_connector_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens on it once closed

    async def test() -> None:
        with pytest.raises(aiohttp.ClientConnectorError, match=f"127.0.0.1:{port}"):
            await pool().post(f"http://127.0.0.1:{port}/v1/chat/completions", b"{}", 5)

    asyncio.run(test())


@pytest.mark.parametrize("read_timeout_s, total_s", [(0.3, 30.0), (30.0, 0.3)])
def test_a_silent_server_times_out_on_the_read_timeout_or_the_deadline(read_timeout_s: float, total_s: float) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{")  # then nothing
        await asyncio.sleep(60)

    async def test(url: str) -> None:
        with pytest.raises(aiohttp.SocketTimeoutError):
            await asyncio.wait_for(pool(read_timeout_s=read_timeout_s).post(url, b"{}", total_s), 20)

    asyncio.run(serve(handler, test))


def test_bytes_that_keep_coming_hold_off_the_read_timeout() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\n")
        for byte in b"[1,2]\n":  # 6 bytes, 0.1 s apart: longer in all than the read timeout
            await asyncio.sleep(0.1)
            writer.write(bytes([byte]))
            await writer.drain()

    async def test(url: str) -> None:
        assert await pool(read_timeout_s=0.35).post(url, b"{}", 10) == (200, b"[1,2]\n")

    asyncio.run(serve(handler, test))


def test_hang_up_mid_answer_is_a_server_disconnect() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"half")
        await writer.drain()
        writer.close()

    async def test(url: str) -> None:
        client = pool()
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await client.post(url, b"{}", 5)
        assert not client._idle.get(url.rsplit("/v1", 1)[0])  # the broken connection is not pooled

    asyncio.run(serve(handler, test))


def test_garbage_is_a_payload_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async def test(url: str) -> None:
        with pytest.raises(aiohttp.ClientPayloadError):
            await pool().post(url, b"{}", 5)

    asyncio.run(serve(handler, test))
