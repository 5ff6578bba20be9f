"""Changes pushed to every replica. A write that other replicas must see (a tenant created, deleted,
re-keyed or granted; an adapter changing state) announces its topic inside its own transaction with
PostgreSQL's NOTIFY, so the message goes out exactly when, and only if, the write commits. Every
replica listens on one connection and reloads what the topic names, on its event loop. Nothing is
polled on a timer: after the listener (re)connects, every topic is reloaded once, so a message missed
while it was away cannot leave the replica stale.

With SQLite (one process) there is nobody to tell: `announce` does nothing and no feed runs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)
CHANNEL = "salora_changes"
TOPICS = ("tenants", "adapters")


def replica_id(port: int) -> str:
    """Names this gateway among the replicas (in canary leases and change messages). Host and port
    stay the same when a replica restarts in place (a pod's container, a systemd unit), so it takes
    back its own leases at once; a port of 0 (chosen by the OS) gets a random suffix instead."""
    suffix = str(port) if port else f"{os.getpid()}-{secrets.token_hex(3)}"
    return f"{socket.gethostname()[:40]}:{suffix}"


class Announcer:
    """Announces a topic from inside a write transaction (see the module docstring)."""

    def __init__(self, replica: str) -> None:
        self.replica = replica

    def __call__(self, session: Session, topic: str) -> None:
        if session.get_bind().dialect.name == "postgresql":
            payload = json.dumps({"topic": topic, "from": self.replica, "at": time.time()})
            session.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": CHANNEL, "payload": payload})


Handler = Callable[[], Awaitable[None]]


class ChangeFeed:
    """Listens for other replicas' announcements and runs each topic's handler on the event loop.
    A topic announced again while its handler runs makes it run once more afterwards, never twice at
    once. `on_lag(seconds)` sees each message's delay from the writer's commit; `on_state(up)` each
    change of the listener's connection."""

    def __init__(self, db_url: str, replica: str, handlers: dict[str, Handler], *,
                 on_lag: Callable[[float], None] = lambda _: None,
                 on_state: Callable[[bool], None] = lambda _: None, reconnect_s: float = 1.0) -> None:
        url = make_url(db_url).set(drivername="postgresql")
        self._conninfo = url.render_as_string(hide_password=False)
        self._replica, self._handlers = replica, handlers
        self._on_lag, self._on_state, self._reconnect_s = on_lag, on_state, reconnect_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._running: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self.connected = threading.Event()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._listen, name="salora-change-feed", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5)
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- the listener thread ---------------------------------------------------------------------

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5) as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    self.connected.set()
                    self._on_state(True)
                    log.info("change feed connected; reloading tenants and adapters")
                    for topic in TOPICS:  # whatever happened while we were not listening
                        self._signal(topic)
                    while not self._stop.is_set():
                        for note in connection.notifies(timeout=0.5):
                            self._received(note.payload)
            except psycopg.Error as e:
                if self.connected.is_set():
                    log.error("change feed lost its database connection (%s); reconnecting", e)
                self.connected.clear()
                self._on_state(False)
                self._stop.wait(self._reconnect_s)

    def _received(self, payload: str) -> None:
        try:
            message = json.loads(payload)
            topic, sender, at = message["topic"], message["from"], float(message["at"])
        except (ValueError, KeyError, TypeError):
            log.warning("change feed: ignoring a malformed message %r", payload[:200])
            return
        if sender == self._replica or topic not in self._handlers:
            return  # this replica made the change itself
        self._on_lag(max(0.0, time.time() - at))
        self._signal(topic)

    def _signal(self, topic: str) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._run, topic)

    # --- on the event loop -----------------------------------------------------------------------

    def _run(self, topic: str) -> None:
        if topic in self._running:
            self._again.add(topic)
            return
        self._running[topic] = asyncio.get_running_loop().create_task(self._handle(topic))

    async def _handle(self, topic: str) -> None:
        try:
            while True:
                self._again.discard(topic)
                try:
                    await self._handlers[topic]()
                except Exception:
                    log.exception("change feed: reloading %s failed", topic)
                if topic not in self._again:
                    return
        finally:
            self._running.pop(topic, None)
