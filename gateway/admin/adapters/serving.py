"""Adapter administration: the multipart upload (read with a size cap as it streams in, saved to a
scratch directory the lifecycle cleans up) and the views of the registry."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import AsyncGenerator
from contextlib import aclosing
from pathlib import Path

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from gateway.adapters.errors import AdapterRejected
from gateway.adapters.lifecycle import UploadPart, storage_error
from gateway.adapters.registry import AdapterRecord
from gateway.admin.adapters.protocol import AdapterDetail, AdapterInfo, CanarySummary, EventInfo
from gateway.context import Context
from gateway.errors import APIError, bad_request, unavailable
from gateway.settings import NAME_PATTERN

MAX_FIELDS = 64


def api_error(e: AdapterRejected) -> APIError:
    return APIError(e.status, str(e), code=e.code, param=e.param)


async def _capped(stream: AsyncGenerator[bytes, None], limit: int) -> AsyncGenerator[bytes, None]:
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > limit:
            raise AdapterRejected(f"the upload is larger than {limit} bytes", code="too_large", status=413)
        yield chunk


class AdapterAdmin:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.lifecycle = ctx.lifecycle

    def _ready(self) -> None:
        if not self.lifecycle.ready:
            raise unavailable(self.ctx.engine.error or "The gateway is still starting; retry shortly.")

    async def upload(self, request: Request) -> AdapterInfo:
        """Fields: `name`, `tenants` (repeated or comma-separated), `actor` (optional), and `file`: one
        archive, or the adapter's (or checkpoint's) files."""
        self._ready()
        limit = self.ctx.settings.lifecycle.max_upload_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise APIError(413, f"the upload is larger than {limit} bytes", code="too_large")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise bad_request("send multipart/form-data with `name`, `tenants` and `file` fields")
        with self.lifecycle.store.scratch() as incoming:
            try:
                async with aclosing(_capped(request.stream(), limit)) as stream:
                    parser = MultiPartParser(request.headers, stream, max_files=self.ctx.settings.lifecycle.max_members,
                                             max_fields=MAX_FIELDS)
                    form = await parser.parse()
            except AdapterRejected as e:
                raise api_error(e) from None
            except MultiPartException as e:
                raise bad_request(f"malformed multipart body: {e}") from None
            try:
                name = form.get("name")
                if not isinstance(name, str) or not re.match(NAME_PATTERN, name):
                    raise bad_request(f"`name` must match {NAME_PATTERN}", param="name")
                tenants = [t.strip() for v in form.getlist("tenants") if isinstance(v, str) for t in v.split(",")
                           if t.strip()]
                actor = form.get("actor")
                parts = []
                for key, value in form.multi_items():
                    if isinstance(value, UploadFile):
                        if key != "file":
                            raise bad_request(f"files go in the `file` field, not {key!r}", param=key)
                        try:
                            parts.append(await asyncio.to_thread(self._save, value, incoming, len(parts)))
                        except OSError as e:
                            raise api_error(storage_error(e)) from None
                try:
                    record = await self.lifecycle.upload(name, tenants, parts,
                                                         actor=actor if isinstance(actor, str) and actor else "admin")
                except AdapterRejected as e:
                    raise api_error(e) from None
            finally:
                await form.close()
        return await asyncio.to_thread(self.info, record)

    @staticmethod
    def _save(upload: UploadFile, incoming: Path, index: int) -> UploadPart:
        """Copy one file part out of the parser's spool; its name is checked later, never used as a path here."""
        path = incoming / f"part-{index}"
        upload.file.seek(0)
        with path.open("xb") as out:
            shutil.copyfileobj(upload.file, out, 1 << 20)
        return UploadPart(upload.filename or "", path)

    def info(self, record: AdapterRecord) -> AdapterInfo:
        last = self.lifecycle.registry.run(record.last_run_id) if record.last_run_id else None
        serving = self.ctx.catalog.serving(record.name) and record.state == "live"
        granted = set(record.tenants)
        callers = [t.name for t in self.ctx.tenants.all() if "*" in t.adapters or t.name in granted or t.may_use(record.name)]
        return AdapterInfo.of(record, serving, self.lifecycle.probing(record), last, callers)

    def detail(self, name: str) -> AdapterDetail:
        record = self._find(name)
        registry = self.lifecycle.registry
        last = registry.run(record.last_run_id) if record.last_run_id else None
        return AdapterDetail(
            **self.info(record).model_dump(),
            report=last.report if last else None,
            runs=[CanarySummary.of(r) for r in registry.runs(record.id)],
            audit=[EventInfo.of(e) for e in registry.events(record.id)],
        )

    def all(self) -> list[AdapterInfo]:
        return [self.info(r) for r in self.lifecycle.registry.all()]

    def _find(self, name: str) -> AdapterRecord:
        try:
            return self.lifecycle.find(name)
        except AdapterRejected as e:
            raise api_error(e) from None

    async def act(self, action: str, name: str, actor: str = "admin", reason: str | None = None) -> AdapterInfo:
        self._ready()
        try:
            if action == "probe":
                record = await self.lifecycle.probe(name, actor)
            elif action == "retire":
                record = await self.lifecycle.retire(name, actor, reason)
            else:
                assert reason is not None
                record = await self.lifecycle.force_live(name, actor, reason)
        except AdapterRejected as e:
            raise api_error(e) from None
        return await asyncio.to_thread(self.info, record)
