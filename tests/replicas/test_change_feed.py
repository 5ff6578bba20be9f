"""The change feed on a real PostgreSQL: a committed write reaches the other replicas' handlers (and
not the writer's own), a rolled-back one reaches nobody, a burst runs a handler again rather than
twice at once, and a listener whose connection is cut reconnects and reloads everything."""

from __future__ import annotations

import asyncio
import time

import psycopg
from sqlalchemy import text

from gateway.changes import Announcer, ChangeFeed
from gateway.db import open_db


class Recorder:
    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[str] = []
        self.running: dict[str, int] = {}  # per topic: different topics may run at once
        self.overlapped = False
        self.delay = delay

    def handler(self, topic: str):
        async def run() -> None:
            self.running[topic] = self.running.get(topic, 0) + 1
            self.overlapped |= self.running[topic] > 1
            await asyncio.sleep(self.delay)
            self.calls.append(topic)
            self.running[topic] -= 1
        return run


async def _wait(check, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the change did not arrive"
        await asyncio.sleep(0.02)


def _feed(url: str, replica: str, recorder: Recorder, **kw) -> ChangeFeed:
    return ChangeFeed(url, replica, {t: recorder.handler(t) for t in ("tenants", "adapters")}, **kw)


def test_committed_changes_reach_the_other_replicas_only(pg_url):
    sessions = open_db(pg_url)

    async def main() -> None:
        mine, theirs, lags = Recorder(), Recorder(), []
        feeds = [_feed(pg_url, "writer", mine), _feed(pg_url, "reader", theirs, on_lag=lags.append)]
        for feed in feeds:
            feed.start()
        try:
            for feed in feeds:
                await asyncio.to_thread(feed.connected.wait, 30)
            await _wait(lambda: len(mine.calls) == 2 and len(theirs.calls) == 2)  # the reload on connecting
            mine.calls.clear(), theirs.calls.clear()
            announce = Announcer("writer")
            with sessions.begin() as session:
                announce(session, "tenants")
                session.execute(text("SELECT 1"))
            await _wait(lambda: theirs.calls == ["tenants"])
            try:
                with sessions.begin() as session:
                    announce(session, "adapters")
                    raise RuntimeError("rolled back")
            except RuntimeError:
                pass
            with sessions.begin() as session:
                announce(session, "tenants")
            await _wait(lambda: theirs.calls == ["tenants", "tenants"])
            assert mine.calls == []  # the writer changed it itself
            assert len(lags) == 2 and all(0 <= lag < 10 for lag in lags)
        finally:
            for feed in feeds:
                await feed.close()

    asyncio.run(main())


def test_a_burst_runs_a_handler_again_after_it_not_alongside(pg_url):
    sessions = open_db(pg_url)

    async def main() -> None:
        slow = Recorder(delay=0.3)
        feed = _feed(pg_url, "reader", slow)
        feed.start()
        try:
            await asyncio.to_thread(feed.connected.wait, 30)
            await _wait(lambda: len(slow.calls) == 2)
            slow.calls.clear()
            announce = Announcer("writer")
            for _ in range(10):
                with sessions.begin() as session:
                    announce(session, "tenants")
            await _wait(lambda: len(slow.calls) >= 1)
            await asyncio.sleep(0.8)
            # Coalesced (a run that starts after several messages covers them all), never concurrent.
            assert not slow.overlapped and 1 <= len(slow.calls) <= 3
        finally:
            await feed.close()

    asyncio.run(main())


def test_a_cut_connection_reconnects_and_reloads_everything(pg_url):
    async def main() -> None:
        recorder, states = Recorder(), []
        feed = _feed(pg_url, "reader", recorder, on_state=states.append, reconnect_s=0.2)
        feed.start()
        try:
            await asyncio.to_thread(feed.connected.wait, 30)
            await _wait(lambda: len(recorder.calls) == 2)
            conninfo = pg_url.replace("postgresql+psycopg://", "postgresql://")
            with psycopg.connect(conninfo, autocommit=True) as admin:
                cut = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                    "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()").fetchall()
            assert cut  # the listener's connection was found and cut
            await _wait(lambda: len(recorder.calls) == 4)  # both topics reloaded after reconnecting
            assert states[0] is True and False in states and states[-1] is True
        finally:
            await feed.close()

    asyncio.run(main())
