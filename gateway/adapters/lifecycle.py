"""The adapter lifecycle: upload -> validation -> canary -> live (or rejected), retirement, forced
promotion, scheduled re-probes, and restoring every live adapter when the gateway starts.

A candidate is hot-loaded into the serving engine under its own name so the canary can probe it
through the same engine as live traffic, but it is *held back*: `held_back` names adapters that are
loaded and must not be routed to. Promotion only releases it (nothing reloads, nothing restarts), so
requests to other adapters never notice. Canary runs are serialised: one at a time per gateway.

Crash safety: every step is a database transaction first and an effect second, and a restart finishes
or undoes what a crash cut short (`start`). An upload holds a claim (a locked scratch directory named
by its record id) until it is probing; a restart removes uploads whose claim no live process holds.
A probing adapter's canary runs again. A live one is loaded and granted to its tenants again.

Replicas (several gateways on one PostgreSQL database and one shared adapter store): an adapter's
canary runs on one replica, the holder of its lease in the database, renewed while the run lasts; if
the holder dies, the lease expires and another replica's schedule takes the run over. Each replica
keeps its engine in line with the registry (`sync`, run whenever another replica announces an
adapter change): live adapters loaded, anything else unloaded, unless this replica is probing it."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.adapters.archive import unpack
from gateway.adapters.errors import AdapterRejected
from gateway.adapters.registry import INACTIVE, AdapterRecord, NameInUse, Registry, State
from gateway.adapters.store import AdapterStore
from gateway.adapters.validation import AdapterInfo, BaseModelInfo, inspect_base, validate
from gateway.canary.runner import CanaryError, CanaryRunner
from gateway.crashpoints import crash_point
from gateway.engines.base import Engine, EngineError
from gateway.metrics import Metrics
from gateway.settings import Settings
from gateway.tenants import TenantStore
from salora.errors import SaLoRAError
from salora.judge import Judge
from salora.modeldir import resolve_model_dir

log = logging.getLogger(__name__)
CANARY = "canary"  # the actor of automatic decisions in the audit log


@dataclass(frozen=True)
class UploadPart:
    """One uploaded file: its name as sent, and where the HTTP layer saved it."""

    filename: str
    path: Path


def _not_found(name: str) -> AdapterRejected:
    return AdapterRejected(f"No adapter named {name!r}.", code="adapter_not_found", status=404)


def _conflict(message: str) -> AdapterRejected:
    return AdapterRejected(message, code="invalid_state", status=409)


def storage_error(e: OSError) -> AdapterRejected:
    return AdapterRejected(f"the gateway cannot store the upload: {e.strerror or e}", code="storage_error", status=507)


def _has_files(record: AdapterRecord) -> None:
    """An upload rejected before it was stored has nothing to load: it must be uploaded again."""
    if record.source != "config" and record.sha256 is None:
        raise _conflict(f"{record.name!r} was rejected before it was stored ({record.reason}); upload it again.")


class Lifecycle:
    def __init__(self, settings: Settings, engine: Engine, registry: Registry, tenants: TenantStore,
                 metrics: Metrics, judge: Judge, on_change: Callable[[], None], replica: str = "gateway") -> None:
        """`on_change` runs whenever the set of served adapters changes (it creates their metric series);
        `replica` names this gateway in canary leases."""
        self.settings = settings
        self.replica = replica
        self.config = settings.lifecycle
        self.engine = engine
        self.registry = registry
        self.tenants = tenants
        self.metrics = metrics
        self.on_change = on_change
        self.store = AdapterStore(settings.state_dir / "adapters")
        self.runner = CanaryRunner(engine, settings.canary, judge, registry)
        self.held_back: frozenset[str] = frozenset()  # loaded in the engine, not to be routed to
        self.live: frozenset[str] = frozenset()  # the names the registry has live, as of the last change
        self._unloading: frozenset[str] = frozenset()  # held back, their unload failed: retried on schedule
        self._resident: dict[str, str] = {}  # uploaded adapters loaded in the engine: name -> record id
        self._leaving: frozenset[str] = frozenset()  # being retired here
        self._sync_lock = asyncio.Lock()
        self.ready = False  # live adapters restored
        self._base: BaseModelInfo | None = None
        self._base_lock = asyncio.Lock()
        self._canary_lock = asyncio.Lock()
        self._runs: dict[str, asyncio.Task[None]] = {}  # record id -> its canary run
        self._scheduler: asyncio.Task[None] | None = None
        self._started = time.time()

    # --- start and stop ------------------------------------------------------------------------

    async def start(self) -> None:
        """Called once the engine is up: drop uploads a crash cut short and the files crashes left,
        register the config's adapters, load every live adapter, resume interrupted canaries, then
        start the schedule."""
        await self._recover_uploads()
        await asyncio.to_thread(self._sync_config)
        for record in await asyncio.to_thread(self.registry.all, (State.LIVE,)):
            await asyncio.to_thread(self.tenants.grant, record.name, record.tenants)  # config tenants were reset
            if record.source != "config" and record.name not in self.engine.adapters():
                await self._restore(record)
        for record in await asyncio.to_thread(self.registry.all, (State.PROBING,)):
            await self._claim(record, "restart")
        await self._refresh()
        self.ready = True
        tick = min(self.config.retry_interval_s, self.config.reprobe_interval_s or float("inf"))
        self._scheduler = asyncio.create_task(self._schedule(tick))

    async def _recover_uploads(self) -> None:
        """An upload still uploaded or validating whose claim no live process holds was cut short (a
        crash, or a failure whose own cleanup could not be written, e.g. on a full disk). It ends as a
        failed check does, rejected: its client saw the request fail and uploads again, and resuming
        it would answer that retry with a 409. Then the scratch directories and stored files no live
        upload or record refers to are swept. Run at start and at every tick of the schedule."""
        for record in await asyncio.to_thread(self.registry.all, (State.UPLOADED, State.VALIDATING)):
            if not await asyncio.to_thread(self.store.in_use, record.id):
                log.warning("the upload of adapter %s was cut short (%s); rejected", record.name, record.state)
                await self._abandon(record, "the upload was cut short before it was checked; upload it again")
        await asyncio.to_thread(self.store.sweep, self.registry.hashes)

    async def close(self) -> None:
        tasks = [t for t in (self._scheduler, *self._runs.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.runner.close()

    def _sync_config(self) -> None:
        """Adapters declared in the settings are live by the operator's word: they are registered (so
        they are listed, probed on schedule, and shown on dashboards) but never validated or gated."""
        configured = self.settings.adapters
        for record in self.registry.all((State.PROBING, State.LIVE)):
            if record.source == "config" and record.name not in configured:
                self.registry.transition(record.id, State.RETIRED, actor="config", action="retire",
                                         reason="no longer in the gateway's config")
            elif record.source != "config" and record.name in configured:  # the config's adapter wins
                to = State.RETIRED if record.state == State.LIVE else State.REJECTED
                self.registry.transition(record.id, to, actor="config", action=to.value,
                                         reason="replaced by the config's adapter of the same name")
        for name, path in configured.items():
            record = self.registry.find(name)
            if record is not None and record.source == "config" and record.state == State.LIVE:
                if record.path != str(path):
                    self.registry.update(record.id, path=str(path), actor="config", action="config")
                continue
            try:
                self.registry.create(name, source="config", tenants=[], base_model=self.engine.model_id,
                                     actor="config", state=State.LIVE, path=str(path))
            except NameInUse:  # an upload of that name is being validated right now
                log.error("adapter %s of the config is not registered: an upload of that name is in progress", name)

    async def _restore(self, record: AdapterRecord) -> None:
        try:
            await self.engine.load_adapter(record.name, self._path(record))
            self._resident[record.name] = record.id
        except Exception as e:  # one unreadable adapter must not keep the others (or the gateway) down
            log.error("cannot restore adapter %s: %s", record.name, e)
            self.metrics.engine_errors.labels(self.engine.name, "load").inc()
            await asyncio.to_thread(self.registry.update, record.id, flagged=f"not loaded at start: {e}",
                                    actor="gateway", action="restore_failed", reason=str(e))

    async def sync(self) -> None:
        """Bring this replica's engine in line with the registry after another replica changed an
        adapter: live uploads it lacks (or holds other weights of) are loaded; loaded ones no longer
        live are unloaded. What this replica holds back (its own uploads, canaries, retirements) is
        its own business and left alone, except a hold whose record another replica ended."""
        async with self._sync_lock:
            live = {r.name: r for r in await asyncio.to_thread(self.registry.all, (State.LIVE,))
                    if r.source != "config"}
            changed = False
            for name, record_id in list(self._resident.items()):
                if name in live and live[name].id == record_id:
                    if name in self.held_back and record_id not in self._runs and name not in self._leaving:
                        self.held_back -= {name}  # held here for a canary that another replica finished
                        changed = True
                    continue
                if record_id in self._runs or not await self._ended(record_id):  # read again: it may have
                    continue                                                   # gone live here meanwhile
                log.info("adapter %s is no longer live (changed on another replica); unloading it", name)
                self.held_back |= {name}
                await self._unload(name)
                self._clear_gauges(name)
                changed = True
            for name, record in live.items():
                if name not in self.engine.adapters() and name not in self.held_back:
                    log.info("adapter %s went live on another replica; loading it", name)
                    await self._restore(record)
                    changed = True
            if changed:
                await self._refresh()

    async def _ended(self, record_id: str) -> bool:
        record = await asyncio.to_thread(self.registry.get, record_id)
        return record is None or record.state in INACTIVE

    # --- queries --------------------------------------------------------------------------------

    def find(self, name: str) -> AdapterRecord:
        record = self.registry.find(name)
        if record is None:
            raise _not_found(name)
        return record

    def probing(self, record: AdapterRecord) -> bool:
        """A canary run of `record` is going on here, or on another replica holding its lease."""
        return record.id in self._runs or (record.leased() and record.lease_owner != self.replica)

    async def base(self) -> BaseModelInfo:
        """The served base's layer shapes and weight identity, read once."""
        async with self._base_lock:
            if self._base is None:
                try:
                    model_dir = await asyncio.to_thread(resolve_model_dir, self.settings.model)
                    self._base = await asyncio.to_thread(inspect_base, self.engine.model_id, model_dir)
                except (SaLoRAError, OSError) as e:
                    raise AdapterRejected(f"cannot read the base model's weights to check adapters against: {e}",
                                          code="base_unavailable", status=503) from e
            return self._base

    # --- upload ---------------------------------------------------------------------------------

    async def upload(self, name: str, tenants: list[str], parts: list[UploadPart], actor: str = "admin") -> AdapterRecord:
        """Validate, store and hot-load (held back) an uploaded adapter, then start its canary. A failed
        check raises AdapterRejected and leaves no record, no file and nothing loaded."""
        unknown = sorted(t for t in set(tenants) if self.tenants.get(t) is None)
        if unknown:
            raise AdapterRejected(f"unknown tenants: {', '.join(unknown)}", code="unknown_tenant")
        if name == self.engine.model_id or name in self.settings.routes:
            raise AdapterRejected(f"{name!r} is the name of a model this gateway serves; choose another name.",
                                  code="name_in_use", status=409, param="name")
        base = await self.base()
        record_id = uuid.uuid4().hex
        with self.store.scratch(record_id) as work:  # the claim: see _recover_uploads
            try:
                record = await asyncio.to_thread(self.registry.create, name, source="upload", tenants=tenants,
                                                 base_model=self.engine.model_id, actor=actor, record_id=record_id)
            except NameInUse:
                active = self.registry.find(name)
                raise AdapterRejected(f"An adapter named {name!r} is {active.state if active else 'in use'}; retire "
                                      "it or choose another name.", code="name_in_use", status=409) from None
            loaded = False
            try:
                await asyncio.to_thread(self.registry.transition, record.id, State.VALIDATING, actor=actor,
                                        action="validate")
                await self._refresh()
                try:
                    info, staged = await asyncio.to_thread(self._validate, parts, base, work)
                    # The hash is recorded before the files are stored, so a stored adapter no record
                    # names is always a crash's leftover (AdapterStore.sweep).
                    record = await asyncio.to_thread(self.registry.update, record.id, sha256=info.sha256)
                    path = await asyncio.to_thread(self.store.put, staged, info.sha256)
                except OSError as e:  # a full or failing disk: the client is told, nothing half-written stays
                    raise storage_error(e) from e
                crash_point("upload:stored")
                self.held_back |= {name}
                try:
                    await self.engine.load_adapter(name, path)
                except Exception as e:
                    raise AdapterRejected(f"the {self.engine.name} engine cannot load the adapter: {e}",
                                          code="engine_rejected") from e
                loaded = True
                self._resident[name] = record.id
                record = await asyncio.to_thread(
                    self.registry.transition, record.id, State.PROBING, actor=actor, action="probe",
                    source="checkpoint" if info.source == "checkpoint" else "upload", rank=info.rank,
                    target_modules=info.target_modules, size_bytes=info.size_bytes, **self._lease())
                await self._refresh()
            except BaseException as e:
                if loaded:
                    await self._unload(name)
                else:
                    self.held_back -= {name}
                await self._abandon(record, str(e) if isinstance(e, AdapterRejected)
                                    else f"the upload failed: {type(e).__name__}: {e}")
                raise
        self._spawn(record, "upload")
        return record

    def _validate(self, parts: list[UploadPart], base: BaseModelInfo, work: Path) -> tuple[AdapterInfo, Path]:
        """In a worker thread: unpack and check in the scratch directory `work`; returns the adapter's
        checked files, staged there."""
        (work / "unpacked").mkdir()
        root = unpack([(p.filename, p.path) for p in parts], work / "unpacked", self.config)
        return validate(root, work, base, self.config.max_rank)

    async def _abandon(self, record: AdapterRecord, reason: str) -> None:
        """End an upload that failed: rejected with `reason`, its files removed unless another record
        shares them. If even that cannot be written (a full disk), the record stays where it is and the
        schedule's next tick (`_recover_uploads`) ends it once the claim is released."""
        try:
            fresh = await asyncio.to_thread(self.registry.get, record.id)
            if fresh is None or fresh.state in INACTIVE:
                return
            await asyncio.to_thread(self.registry.transition, record.id, State.REJECTED, actor="gateway",
                                    action="reject", reason=reason[:2000], sha256=None)
            if fresh.sha256 and await asyncio.to_thread(self.registry.uses, fresh.sha256) == 0:
                await asyncio.to_thread(self.store.remove, fresh.sha256)
        except Exception:
            log.exception("cannot record the failed upload of %s; the schedule retries", record.name)
        await self._refresh()

    # --- admin actions --------------------------------------------------------------------------

    async def probe(self, name: str, actor: str = "admin") -> AdapterRecord:
        """Run the canary again: on a live adapter it may flag it; a rejected one that passes goes live;
        a probing one whose last run ended in an error gets another try."""
        record = self.find(name)
        if self.probing(record):
            raise _conflict(f"A canary run of {name!r} is in progress.")
        _has_files(record)
        if record.state == State.REJECTED:
            try:
                record = await asyncio.to_thread(self.registry.transition, record.id, State.PROBING, actor=actor,
                                                 action="probe", **self._lease())
            except NameInUse:
                raise _conflict(f"Another adapter named {name!r} is active.") from None
            await self._refresh()
            if not await self._load_for_probing(record):
                raise AdapterRejected(f"the {self.engine.name} engine cannot load {name!r}", code="engine_rejected",
                                      status=503)
        elif record.state not in (State.LIVE, State.PROBING):  # probing and idle: its last run erred
            raise _conflict(f"{name!r} is {record.state}; it cannot be probed.")
        self._spawn(record, "manual")
        return record

    async def retire(self, name: str, actor: str, reason: str | None) -> AdapterRecord:
        """Take an adapter out of service in any active state, keeping its record: a live one is
        retired, a probing one too (its canary is cancelled), an upload a failure left behind is
        rejected. Only an upload being checked right now must finish first."""
        record = self.find(name)
        if record.source == "config":
            raise _conflict(f"{name!r} is declared in the gateway's config; remove it there.")
        if record.state in INACTIVE:
            raise _conflict(f"{name!r} is already {record.state}.")
        if record.state in (State.UPLOADED, State.VALIDATING):
            if await asyncio.to_thread(self.store.in_use, record.id):
                raise _conflict(f"{name!r} is being checked right now; retry in a moment.")
            await self._abandon(record, reason or f"removed by {actor} before it was checked")
            return self.find_id(record.id)
        run = self._runs.get(record.id)
        if run is not None:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        default = "retired by an admin" if record.state == State.LIVE else "its canary was cancelled by an admin"
        return await self._retire(record, actor, reason or default)

    def find_id(self, record_id: str) -> AdapterRecord:
        record = self.registry.get(record_id)
        if record is None:
            raise _not_found(record_id)
        return record

    async def _retire(self, record: AdapterRecord, actor: str, reason: str) -> AdapterRecord:
        self._leaving |= {record.name}  # still live in the registry for a moment: `sync` must not release it
        try:
            return await self._retire_held(record, actor, reason)
        finally:
            self._leaving -= {record.name}

    async def _retire_held(self, record: AdapterRecord, actor: str, reason: str) -> AdapterRecord:
        self.held_back |= {record.name}
        # Revoked first: a crash in between leaves it live, and the start grants it again. The other
        # way round, tenants would keep a retired name, and with it a later adapter of that name.
        await asyncio.to_thread(self.tenants.revoke, record.name)
        record = await asyncio.to_thread(self.registry.transition, record.id, State.RETIRED, actor=actor,
                                         action="retire", reason=reason)
        await self._unload(record.name)
        self._clear_gauges(record.name)
        await self._refresh()
        return record

    async def _unload(self, name: str) -> None:
        """Unload a held-back adapter, then release the hold. If the engine fails to unload it, it
        stays held back (loaded, but never routed to) and the schedule retries."""
        if name in self.engine.adapters():
            try:
                await self.engine.unload_adapter(name)
            except Exception as e:
                log.error("cannot unload adapter %s (%s); it stays held back and the unload is retried", name, e)
                self.metrics.engine_errors.labels(self.engine.name, "unload").inc()
                self._unloading |= {name}
                return
        self._unloading -= {name}
        self._resident.pop(name, None)
        self.held_back -= {name}

    async def force_live(self, name: str, actor: str, reason: str) -> AdapterRecord:
        """An admin override: a rejected adapter goes live anyway; who and why go to the audit log."""
        record = self.find(name)
        if record.state != State.REJECTED:
            raise _conflict(f"{name!r} is {record.state}; only a rejected adapter can be forced live.")
        _has_files(record)
        try:
            await self._hold_and_load(record)
        except Exception as e:
            raise AdapterRejected(f"the {self.engine.name} engine cannot load {name!r}: {e}", code="engine_rejected",
                                  status=503) from e
        try:
            record = await asyncio.to_thread(self.registry.transition, record.id, State.LIVE, actor=actor,
                                             action="force_live", reason=reason)
        except NameInUse:
            await self._unload(record.name)
            raise _conflict(f"Another adapter named {name!r} is active.") from None
        return await self._release(record)

    # --- the canary -----------------------------------------------------------------------------

    def _spawn(self, record: AdapterRecord, trigger: str) -> None:
        task = asyncio.create_task(self._canary(record.id, trigger))
        self._runs[record.id] = task
        task.add_done_callback(lambda _: self._runs.pop(record.id, None))

    async def _canary(self, record_id: str, trigger: str) -> None:
        async with self._canary_lock:
            record = await asyncio.to_thread(self.registry.get, record_id)
            if record is None or record.state not in (State.PROBING, State.LIVE):
                return
            if not await asyncio.to_thread(self.registry.take_lease, record_id, self.replica, self.config.canary_lease_s):
                log.info("the canary of %s runs on another replica", record.name)
                return
            renewing = asyncio.create_task(self._renew(record_id))
            started = datetime.now(UTC)
            try:
                base = await self.base()
                report = await self.runner.run(record.name, base.key)
                crash_point("canary:judged")
            except (CanaryError, EngineError, AdapterRejected) as e:
                log.error("canary run of %s failed: %s", record.name, e)
                report = {"result": "error", "error": str(e)}
            except Exception as e:  # a bug must not leave the adapter waiting without a trace
                log.exception("canary run of %s failed", record.name)
                report = {"result": "error", "error": f"{type(e).__name__}: {e}"}
            except asyncio.CancelledError:  # retired, or the gateway stops: the next replica need not wait
                await asyncio.shield(asyncio.to_thread(self.registry.release_lease, record_id, self.replica))
                raise
            finally:
                renewing.cancel()
            if not await asyncio.to_thread(self.registry.release_lease, record_id, self.replica):
                log.error("the canary run of %s lost its lease to another replica; its verdict is dropped", record.name)
                return
            if await self._ended(record_id):  # retired through another replica while it was probed here
                if self._resident.get(record.name) == record_id:
                    await self._unload(record.name)
                return
            await asyncio.to_thread(self.registry.add_run, record.id, trigger, report["result"], started, report)
            self.metrics.canary_runs.labels(report["result"]).inc()
            if report["result"] == "error":
                return
            self._set_gauge(self.engine.model_id, report, "base")
            await self._verdict(record_id, report)

    async def _renew(self, record_id: str) -> None:
        """Keep the lease while the run lasts (a replica that dies stops renewing, and others take over)."""
        while True:
            await asyncio.sleep(self.config.canary_lease_s / 3)
            try:
                await asyncio.to_thread(self.registry.take_lease, record_id, self.replica, self.config.canary_lease_s)
            except Exception:
                log.exception("cannot renew the canary lease of %s", record_id)

    def _lease(self) -> dict[str, Any]:
        """The lease fields of a transition into probing: the replica moving it there runs its canary."""
        return {"lease_owner": self.replica,
                "lease_until": datetime.now(UTC) + timedelta(seconds=self.config.canary_lease_s)}

    async def _claim(self, record: AdapterRecord, trigger: str) -> None:
        """Take over a probing adapter's canary: the lease first (replicas asking at once: one gets
        it), then the adapter loaded here, held back, for the run."""
        if not await asyncio.to_thread(self.registry.take_lease, record.id, self.replica, self.config.canary_lease_s):
            return
        if await self._load_for_probing(record):
            self._spawn(record, trigger)

    async def _verdict(self, record_id: str, report: dict[str, Any]) -> None:
        record = await asyncio.to_thread(self.registry.get, record_id)
        assert record is not None
        passed = report["result"] == "pass"
        reason = "; ".join(report["reasons"]) or None
        if record.state == State.PROBING and passed:
            record = await asyncio.to_thread(self.registry.transition, record.id, State.LIVE, actor=CANARY,
                                             action="promote")
            crash_point("promote:recorded")
            await self._release(record)
        elif record.state == State.PROBING:
            await self._unload_rejected(record, CANARY, reason)
        elif record.state == State.LIVE:
            self._set_gauge(record.name, report, "candidate")
            if passed and record.flagged:
                await asyncio.to_thread(self.registry.update, record.id, flagged=None, actor=CANARY, action="unflag")
            elif not passed and self.config.pull_failing and record.source != "config":
                await self._retire(record, CANARY, f"failed a canary re-probe: {reason}")
            elif not passed:
                log.warning("live adapter %s failed a canary re-probe: %s", record.name, reason)
                await asyncio.to_thread(self.registry.update, record.id, flagged=reason, actor=CANARY, action="flag",
                                        reason=reason)

    async def _load_for_probing(self, record: AdapterRecord) -> bool:
        """Load a probing adapter held back; one that cannot be loaded is rejected with the reason."""
        try:
            await self._hold_and_load(record)
        except Exception as e:
            log.error("cannot load adapter %s for its canary: %s", record.name, e)
            self.metrics.engine_errors.labels(self.engine.name, "load").inc()
            await asyncio.to_thread(self.registry.transition, record.id, State.REJECTED, actor="gateway",
                                    action="reject", reason=f"the {self.engine.name} engine cannot load it: {e}")
            await self._refresh()
            return False
        return True

    async def _unload_rejected(self, record: AdapterRecord, actor: str, reason: str | None) -> None:
        await asyncio.to_thread(self.registry.transition, record.id, State.REJECTED, actor=actor, action="reject",
                                reason=reason)
        await self._unload(record.name)
        self._clear_gauges(record.name)
        await self._refresh()

    async def _hold_and_load(self, record: AdapterRecord) -> None:
        """Load an adapter for probing without letting traffic reach it."""
        self.held_back |= {record.name}
        if record.name not in self.engine.adapters():
            try:
                await self.engine.load_adapter(record.name, self._path(record))
            except Exception:
                self.held_back -= {record.name}
                raise
            if record.source != "config":
                self._resident[record.name] = record.id

    async def _release(self, record: AdapterRecord) -> AdapterRecord:
        """A loaded adapter that just became live: grant its tenants, then let traffic in."""
        await asyncio.to_thread(self.tenants.grant, record.name, record.tenants)
        self.held_back -= {record.name}
        if record.last_run_id:
            run = await asyncio.to_thread(self.registry.run, record.last_run_id)
            if run is not None and run.result != "error":
                self._set_gauge(record.name, run.report, "candidate")
        await self._refresh()
        return record

    async def _schedule(self, tick: float) -> None:
        """Retry canaries that ended in an error; probe live adapters again every `reprobe_interval_s`."""
        while True:
            await asyncio.sleep(tick)
            try:
                await self._due()
            except Exception:
                log.exception("the canary schedule failed; trying again at the next tick")

    async def _due(self) -> None:
        for name in sorted(self._unloading):
            await self._unload(name)
        await self._recover_uploads()
        now = time.time()
        for record in await asyncio.to_thread(self.registry.all, (State.PROBING, State.LIVE)):
            if self.probing(record):
                continue
            run = await asyncio.to_thread(self.registry.run, record.last_run_id) if record.last_run_id else None
            last = run.finished_at.timestamp() if run else self._started
            if record.state == State.PROBING and (run is None or now - last >= self.config.retry_interval_s):
                await self._claim(record, "retry" if run else "restart")
            elif record.state == State.LIVE and self.config.reprobe_interval_s and now - last >= self.config.reprobe_interval_s:
                self._spawn(record, "schedule")

    # --- helpers --------------------------------------------------------------------------------

    def _path(self, record: AdapterRecord) -> Path:
        if record.source == "config":
            assert record.path is not None
            return Path(record.path)
        assert record.sha256 is not None
        return self.store.path(record.sha256)

    def _set_gauge(self, adapter: str, report: dict[str, Any], who: str) -> None:
        for probe in ("harmful", "benign"):
            self.metrics.canary_refusal_rate.labels(adapter, probe).set(report["rates"][probe][who]["refusal_rate"])

    def _clear_gauges(self, adapter: str) -> None:
        for probe in ("harmful", "benign"):
            try:
                self.metrics.canary_refusal_rate.remove(adapter, probe)
            except KeyError:
                pass

    async def _refresh(self) -> None:
        """The live names (gateway/catalog.py routes only to these), the state gauge (every state, 0
        for none) and the served adapters' metric series."""
        live = await asyncio.to_thread(self.registry.all, (State.LIVE,))
        self.live = frozenset(r.name for r in live)
        counts = await asyncio.to_thread(self.registry.counts)
        for state, n in counts.items():
            self.metrics.adapters.labels(state.value).set(n)
        self.on_change()

