"""`PreparedCycle` writes a prepared head as it is, with uvicorn's default headers and its
connection handling, in one write with the body, and hands every other message to uvicorn's own
`send`."""

from __future__ import annotations

import asyncio

import pytest
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from gateway.response_head import PreparedCycle, PreparedHead

DEFAULTS = [(b"date", b"Fri, 04 Dec 2026 21:00:00 GMT"), (b"server", b"uvicorn")]


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class _Flow:
    write_paused = False


def _cycle(cls: type[RequestResponseCycle], keep_alive: bool) -> tuple[RequestResponseCycle, _Transport]:
    transport = _Transport()
    cycle = cls(scope={"method": "POST", "http_version": "1.1"}, transport=transport, flow=_Flow(),  # type: ignore[arg-type]
                logger=None, access_logger=None, access_log=False, default_headers=DEFAULTS,  # type: ignore[arg-type]
                message_event=asyncio.Event(), expect_100_continue=False, keep_alive=keep_alive,
                on_response=lambda: None)
    return cycle, transport


@pytest.mark.parametrize("keep_alive", [True, False])
def test_a_prepared_head_is_written_as_uvicorn_writes_its_pairs(keep_alive: bool) -> None:
    body = b'{"ok":true}'
    head = PreparedHead(b"x-ratelimit-limit-requests: 5\r\ncontent-length: %d\r\ncontent-type: application/json\r\n"
                        % len(body), len(body)).plus(b"x-request-id: req_1\r\n")

    async def run(cls: type[RequestResponseCycle], headers: object) -> tuple[list[bytes], RequestResponseCycle]:
        cycle, transport = _cycle(cls, keep_alive)
        await cycle.send({"type": "http.response.start", "status": 200, "headers": headers})
        await cycle.send({"type": "http.response.body", "body": body})
        return transport.written, cycle

    fast, cycle = asyncio.run(run(PreparedCycle, head))
    plain, _ = asyncio.run(run(RequestResponseCycle, list(head)))
    assert b"".join(fast) == b"".join(plain)  # byte for byte uvicorn's own answer from the same pairs
    assert [w for w in fast if w] == [b"".join(fast)] and len([w for w in plain if w]) == 2  # one write, not two
    assert fast[0].startswith(b"HTTP/1.1 200 OK\r\ndate: Fri, 04 Dec 2026 21:00:00 GMT\r\nserver: uvicorn\r\n")
    assert (b"connection: close\r\n" in fast[0]) is not keep_alive
    assert cycle.response_complete and cycle.transport.closed is not keep_alive  # type: ignore[attr-defined]


def test_a_body_longer_than_the_prepared_length_is_refused_as_by_uvicorn() -> None:
    async def run() -> None:
        cycle, _ = _cycle(PreparedCycle, True)
        await cycle.send({"type": "http.response.start", "status": 200,
                          "headers": PreparedHead(b"content-length: 2\r\n", 2)})
        await cycle.send({"type": "http.response.body", "body": b"abc"})

    with pytest.raises(RuntimeError, match="longer than Content-Length"):
        asyncio.run(run())


def test_plain_pairs_still_get_uvicorns_checks() -> None:
    async def run() -> None:
        cycle, _ = _cycle(PreparedCycle, True)
        await cycle.send({"type": "http.response.start", "status": 200, "headers": [(b"x-bad", b"a\r\nb")]})

    with pytest.raises(RuntimeError, match="Invalid HTTP header value"):
        asyncio.run(run())


def test_a_prepared_head_reads_as_pairs() -> None:
    head = PreparedHead(b"a: 1\r\nb: two words\r\n", 0)
    assert list(head) == [(b"a", b"1"), (b"b", b"two words")]
    assert list(head.plus(b"c: 3\r\n"))[-1] == (b"c", b"3") and head.content_length == 0


@pytest.mark.parametrize("given", [b"abc\n", b"abc\r\nx-evil: 1", b"a b", b"", b"x" * 129])
def test_a_client_request_id_that_is_no_plain_token_is_replaced(given: bytes) -> None:
    """The request id is echoed in the prepared head unchecked, so only a plain token may be kept
    (a trailing newline once passed a `^...$` pattern)."""
    from gateway.request_id import RequestId

    sent: list[dict] = []

    async def app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        await send({"type": "http.response.start", "status": 200, "headers": PreparedHead(b"content-length: 0\r\n", 0)})

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "headers": [(b"x-request-id", given)]}
    asyncio.run(RequestId(app)(scope, None, send))  # type: ignore[arg-type]
    rid = dict(sent[0]["headers"])[b"x-request-id"]
    assert rid != given and rid.startswith(b"req_") and len(rid) == 36
    kept: list[dict] = []

    async def keep(message: dict) -> None:
        kept.append(message)

    asyncio.run(RequestId(app)({"type": "http", "headers": [(b"x-request-id", b"trace-1.a:b")]}, None, keep))  # type: ignore[arg-type]
    assert dict(kept[0]["headers"])[b"x-request-id"] == b"trace-1.a:b"
