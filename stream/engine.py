"""The asyncio engine: sources in, beats segmented per device, frames rendered and published.

    engine = Engine([MqttSource(...)], make_backend("sim"), Publisher("tcp://127.0.0.1:5556"), "data")
    await engine.run(duration=None)          # until stop(), SIGTERM (see cli/serve) or the sources end

Tasks: one pump per source (reads chunks, persists them, checks and segments them on the
loop: all O(chunk) and non-blocking), one render loop per device (takes the oldest
waiting beat, renders it in the executor so sources keep flowing, publishes its frames
in order), and a watchdog (no data for `signal_timeout_s` → signal_lost). Per-device beat
queues are bounded with a drop-oldest policy (`EngineLimits`). Bad input never stops the
engine: it becomes a status message on ``status/<device>`` and a counter.

Events that concern no single device (a broker disconnect, a refused device) are
published as device ``_engine``.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any, AsyncIterable, Callable, Iterable, Sequence

from ..bridges.chunk import EcgChunk, RrIntervals
from ..bridges.status import SourceStatus
from . import protocol
from .backends import Backend
from .datadir import DataDir
from .publish import Publisher
from .session import EngineLimits, Session, source_status_code

log = logging.getLogger(__name__)

ENGINE_DEVICE = "_engine"
MAX_REFUSED_REMEMBERED = 10_000  # refused ids reported once each; past this, only counted


class RenderThreads(Executor):
    """A fixed set of daemon worker threads for the backend's calls.

    ThreadPoolExecutor's threads are joined when the interpreter exits, so one render stuck
    in a backend kept a stopped daemon alive until it was killed; these are waited for at
    most `stop_timeout_s` (Engine._shutdown) and then left to die with the process."""

    def __init__(self, workers: int, name: str = "echopulse-render") -> None:
        self._jobs: queue.SimpleQueue[tuple[Future, Callable[..., Any], tuple, dict] | None] = queue.SimpleQueue()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        if self._closed:
            raise RuntimeError("cannot schedule new renders after shutdown")
        future: Future = Future()
        self._jobs.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed = True
        if cancel_futures:
            with contextlib.suppress(queue.Empty):
                while (job := self._jobs.get_nowait()) is not None:
                    job[0].cancel()
        for _ in self._threads:
            self._jobs.put(None)  # one stop mark per thread, behind any job left
        if wait:
            for thread in self._threads:
                thread.join()

    @property
    def busy(self) -> int:
        """Threads still running (a call in flight, or not yet at their stop mark)."""
        return sum(thread.is_alive() for thread in self._threads)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args, kwargs = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as err:  # the awaiting task gets it, as with ThreadPoolExecutor
                future.set_exception(err)
            else:
                future.set_result(result)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Take a left-behind task's outcome, so that its error is not logged as never retrieved."""
    if not future.cancelled():
        future.exception()


class Engine:
    """Serve any number of devices from any number of sources through one backend."""

    def __init__(
        self,
        sources: Sequence[AsyncIterable[Any]],
        backend: Backend,
        publisher: Publisher,
        data_dir: str | Path | None = None,
        *,
        limits: EngineLimits | None = None,
        devices: Iterable[str] | None = None,
    ) -> None:
        self.sources = list(sources)
        self.backend = backend
        self.publisher = publisher
        self.limits = limits or EngineLimits()
        self.allowed = set(devices) if devices is not None else None
        self.data = DataDir(data_dir) if data_dir is not None else None
        self.sessions: dict[str, Session] = {}
        self.engine_counters: Counter[str] = Counter()
        self._refused: set[str] = set()
        self._stop = asyncio.Event()
        self.started = asyncio.Event()  # set once warmed up and the sources are open
        self._renders: dict[str, asyncio.Task[None]] = {}
        self._executor: RenderThreads | None = None
        self._stop_deadline: float | None = None  # monotonic time by which a stop must be done

    # -- public -------------------------------------------------------------------------

    def counters(self) -> dict[str, dict[str, float]]:
        """Counters per device, plus ``_engine`` for engine-wide ones (a copy, for metrics)."""
        out = {device: dict(s.counters) for device, s in self.sessions.items()}
        out[ENGINE_DEVICE] = dict(self.engine_counters)
        return out

    def primes(self) -> dict[str, Any]:
        """How each device's generator was primed (model backends): {"devices": {device:
        "reference" | "simulated"}, "references_waiting": [devices with a loop not seen yet]};
        for /health and /metrics, so an operator sees which patients run on a simulated heart."""
        fields = {device: self.backend.frame_fields(session.state) for device, session in list(self.sessions.items())}
        devices = {device: f["prime"] for device, f in fields.items() if f.get("prime")}
        references = getattr(self.backend, "references", None)
        return {"devices": devices, "references_waiting": references.waiting() if references is not None else []}

    def stop(self) -> None:
        """Ask `run` to finish (safe to call from a signal handler on the loop)."""
        self._stop.set()

    async def run(self, duration: float | None = None) -> None:
        """Serve until stop(), `duration` seconds, or every source has ended (then drain)."""
        self._executor = RenderThreads(self.limits.workers)
        try:
            # First beats must not wait for JIT compiles or model loading.
            if not await self._warmed_up():
                return
            async with contextlib.AsyncExitStack() as stack:
                entered: list[Any] = []  # closed side by side on the way out, those entered so far
                stack.push_async_callback(self._close_sources, entered)
                for source in self.sources:
                    if hasattr(source, "__aenter__"):
                        await source.__aenter__()  # type: ignore[attr-defined]
                        entered.append(source)
                pumps = [asyncio.create_task(self._pump(s), name=f"pump-{i}") for i, s in enumerate(self.sources)]
                watchdog = asyncio.create_task(self._watchdog(), name="watchdog")
                self.started.set()
                stopper = asyncio.create_task(self._stop.wait(), name="stop")
                ended = asyncio.gather(*pumps)
                ended.add_done_callback(_retrieve)  # pumps left behind may end it after run()
                await asyncio.wait([stopper, ended], timeout=duration, return_when=asyncio.FIRST_COMPLETED)
                if ended.done() and not self._stop.is_set():
                    await self._drain()
                self._begin_stop()
                await self._cancel_pumps(pumps, watchdog, stopper)
        finally:
            await self._shutdown()

    async def _warmed_up(self) -> bool:
        """Warm up off the loop; False when stop() came first (torch.compile takes ~40 s,
        longer than a service manager waits after SIGTERM)."""
        warm = asyncio.get_running_loop().run_in_executor(self._executor, self._warm_up)
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait([warm, stopper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not warm.done():
            warm.cancel()  # its thread finishes or dies with the process (_shutdown)
            return False
        warm.result()  # a failed warm-up fails the run
        return True

    # -- sources ------------------------------------------------------------------------

    async def _pump(self, source: AsyncIterable[Any]) -> None:
        try:
            await self._pump_items(source)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a failed source ends; the others keep going
            log.exception("source %r failed", source)
            self.engine_counters["source_failures"] += 1
            self._publish_status(ENGINE_DEVICE, "source", f"source failed: {err}", self.engine_counters)

    async def _pump_items(self, source: AsyncIterable[Any]) -> None:
        async for item in source:
            try:
                if isinstance(item, EcgChunk):
                    self._on_chunk(item)
                elif isinstance(item, SourceStatus):
                    self._on_source_status(item)
                elif isinstance(item, RrIntervals):
                    self._on_rhythm(item)
                else:
                    self.engine_counters["unknown_items"] += 1
            except Exception:  # a bug on one chunk must not stop a fleet
                log.exception("error handling %r", item)
                self.engine_counters["internal_errors"] += 1

    def _session(self, device: str) -> Session | None:
        session = self.sessions.get(device)
        if session is not None:
            return session
        reason = None
        try:
            protocol.check_device(device)
        except protocol.ProtocolError as err:
            reason = str(err)
        if reason is None and self.allowed is not None and device not in self.allowed:
            reason = "not in the device list"
        elif reason is None and len(self.sessions) >= self.limits.max_devices:
            reason = f"over the limit of {self.limits.max_devices} devices"
        if reason is not None:
            self.engine_counters["refused_chunks"] += 1
            # Report each refused device once; remember a bounded number of them.
            if device not in self._refused and len(self._refused) < MAX_REFUSED_REMEMBERED:
                self._refused.add(device)
                self._publish_status(ENGINE_DEVICE, "bad_input", f"refused device {device!r}: {reason}",
                                     self.engine_counters)
            return None
        session = self.sessions[device] = Session(device, self.limits, config=self.backend.ecg_config)
        self._renders[device] = asyncio.create_task(self._render_loop(session), name=f"render-{device}")
        log.info("new device %s", device)
        return session

    def _on_chunk(self, chunk: EcgChunk) -> None:
        session = self._session(chunk.device)
        if session is None:
            return
        if self.data is not None:
            try:
                self.data.append(chunk)  # before any check: the record of what came in
            except (OSError, ValueError, IndexError) as err:  # disk full, a read-only mount, a chunk of bad shape
                session.counters["raw_store_errors"] += 1
                self._report(session, "error", f"raw ECG store: {type(err).__name__}: {err}; the chunk is still used live")
        for code, message in session.ingest(chunk):
            self._report(session, code, message)

    def _on_rhythm(self, item: RrIntervals) -> None:
        session = self._session(item.device)
        if session is None:
            return
        for code, message in session.ingest_rhythm(item):
            self._report(session, code, message)

    def _on_source_status(self, item: SourceStatus) -> None:
        code = source_status_code(item.code)
        message = f"{item.code}: {item.message}" if item.message else item.code
        session = self._session(item.device) if item.device else None
        if session is None:
            self.engine_counters[f"source_{item.code}"] += 1
            if not item.device:  # a refused device's events are counted; its refusal was reported once
                self._publish_status(ENGINE_DEVICE, code, message, self.engine_counters)
            return
        session.counters[f"source_{item.code}"] += 1
        if code == "bad_input":
            session.counters["bad_input"] += 1
        self._report(session, code, message)

    # -- rendering ----------------------------------------------------------------------

    async def _render_loop(self, session: Session) -> None:
        loop = asyncio.get_running_loop()
        try:  # made now, while the detector learns the first beats; retried per beat on failure
            session.state = await loop.run_in_executor(self._executor, self.backend.new_state, session.device)
        except Exception:
            log.exception("%s: backend state failed", session.device)
        while True:
            pending = await session.next_beat()
            beat = pending.beat
            try:
                if session.state is None:
                    session.state = await loop.run_in_executor(self._executor, self.backend.new_state, session.device)
                frames, times = await self._render(session.state, beat)
                config = session.config
                self.publisher.publish_frames(
                    session.device, frames, times=times, beat=pending.index, r_time=float(beat.r_time),
                    rr=float(beat.rr), model=self.backend.name, capture=pending.capture,
                    extra={**protocol.beat_ecg_fields(beat.window, beat.valid, config.fs, config.pre_r_s, float(beat.rr)),
                           **self.backend.frame_fields(session.state)},
                )
            except asyncio.CancelledError:
                raise
            except Exception as err:
                session.counters["render_errors"] += 1
                # One kind of status whatever the beat, so a backend that fails every beat
                # (out of memory) is reported, and its traceback logged, once per status_interval_s.
                if self._report(session, "error", f"rendering failed: beat {pending.index}: {err}"):
                    log.error("%s: rendering beat %d failed", session.device, pending.index, exc_info=True)
            else:
                session.counters["beats_published"] += 1
                session.counters["frames"] += len(frames)
            finally:
                session.mark_done()

    async def _render(self, state: Any, beat: Any) -> tuple[Any, Any]:
        """A backend that batches devices together awaits its own dispatcher; any other
        renders in the executor, so the loop keeps serving sources meanwhile."""
        render_async = getattr(self.backend, "render_async", None)
        if render_async is not None:
            return await render_async(state, beat)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.backend.render, state, beat)

    async def _drain(self) -> None:
        """Finite sources ended: let the queued beats out, within drain_timeout_s."""
        deadline = time.monotonic() + self.limits.drain_timeout_s
        while any(s.busy for s in self.sessions.values()) and time.monotonic() < deadline and not self._stop.is_set():
            await asyncio.sleep(0.01)

    # -- watchdog and statuses ----------------------------------------------------------

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(self.limits.watchdog_interval_s)
            self.publisher.serve_subscriptions()  # late joiners get the latest statuses
            now = time.monotonic()
            forget = self.limits.forget_after_s
            for session in list(self.sessions.values()):
                event = session.check_idle(now)
                if event is not None:
                    self._report(session, *event)
                if forget and now - session.last_data > forget and not session.busy:
                    self._forget(session, now - session.last_data)

    def _forget(self, session: Session, silent_s: float) -> None:
        """Free a long-silent device's session, backend state and slot; its counters go out last."""
        render = self._renders.pop(session.device, None)
        if render is not None:
            render.cancel()  # it waits for a beat that will not come
        del self.sessions[session.device]
        if self.data is not None:
            self.data.close_device(session.device)  # devices under ever new ids would run out of file handles
        self.engine_counters["devices_forgotten"] += 1
        self._publish_status(session.device, "stopped", f"forgotten after {silent_s:.0f} s without data", session.counters)
        self.publisher.forget(session.device)  # late subscribers see no card for it (ids come and go)

    def _report(self, session: Session, code: str, message: str) -> bool:
        """Publish a device's status unless one of its kind went out within status_interval_s."""
        if not session.should_report(code, message, time.monotonic()):
            return False
        self._publish_status(session.device, code, message, session.counters)
        return True

    def _publish_status(self, device: str, code: str, message: str, counters: Any) -> None:
        log.log(logging.INFO if code in ("source", "signal_restored", "stopped") else logging.WARNING,
                "%s %s: %s", device, code, message)
        try:
            self.publisher.publish_status(device, code, message, counters)
        except Exception:  # statuses are best effort; never let one stop the engine
            log.exception("could not publish status %s for %s", code, device)

    # -- shutdown -----------------------------------------------------------------------

    def _begin_stop(self) -> float:
        """The stop's deadline, set once: closing the sources, renders in flight and the
        backend's own work all share stop_timeout_s, so a stop never takes the sum of them."""
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + self.limits.stop_timeout_s
        return self._stop_deadline

    def _stop_time_left(self) -> float:
        return max(0.0, self._begin_stop() - time.monotonic())

    async def _cancel_pumps(self, pumps: list[asyncio.Task[None]], *others: asyncio.Task[Any]) -> None:
        """Cancel the pumps (and the other tasks) within what is left of the stop's time: an
        async generator source runs its own clean-up (an `async with client` in it) when
        its pump is cancelled, and one that hangs there is left behind, as a source's close is."""
        tasks = [*pumps, *others]
        for task in tasks:
            task.cancel()
        _, pending = await asyncio.wait(tasks, timeout=self._stop_time_left())
        for task in pending:
            self._leave_behind(task, task.get_name(), source=task in pumps)

    async def _close_sources(self, sources: list[Any]) -> None:
        """Close the sources side by side: one that hangs must not use up the others' time."""
        await asyncio.gather(*(self._close_source(source) for source in sources))

    async def _close_source(self, source: Any) -> None:
        """Close one source within what is left of the stop's time; never raises. A source
        that hangs on its way out (a broker or radio that never answers) is left behind, not
        awaited: wait_for would wait for its cancellation to finish too."""
        name = type(source).__name__
        try:
            closing = asyncio.ensure_future(source.__aexit__(None, None, None))
        except (Exception, asyncio.CancelledError) as err:  # raised at the call, or no awaitable
            self._source_close_failed(name, err)
            return
        done, _ = await asyncio.wait({closing}, timeout=self._stop_time_left())
        if not done:
            closing.cancel()
            self._leave_behind(closing, f"closing source {name}", source=True)
        elif closing.cancelled():  # its close cancelled itself: .exception() would raise it here
            self._source_close_failed(name, asyncio.CancelledError("cancelled while closing"))
        elif closing.exception() is not None:
            self._source_close_failed(name, closing.exception())

    def _leave_behind(self, task: asyncio.Future[Any], what: str, source: bool) -> None:
        """Give up on a task at stop (it ends with the process, its outcome read then);
        `source`: a source left open, counted in sources_left_open."""
        task.add_done_callback(_retrieve)
        if source:
            self.engine_counters["sources_left_open"] += 1
        log.warning("%s did not finish within stop_timeout_s (%g s): left behind", what, self.limits.stop_timeout_s)

    def _source_close_failed(self, name: str, err: BaseException) -> None:
        self.engine_counters["source_close_failures"] += 1
        log.warning("source %s failed to close: %s: %s", name, type(err).__name__, err)

    async def _shutdown(self) -> None:
        deadline = self._begin_stop()
        for task in self._renders.values():
            task.cancel()
        if self._renders:
            await asyncio.wait(list(self._renders.values()), timeout=self._stop_time_left())
        for session in self.sessions.values():
            self._publish_status(session.device, "stopped", "engine stopped", session.counters)
        if self.data is not None:
            self.data.close()
        if self._executor is not None:
            # Beats not started are abandoned; renders in flight get what is left of
            # stop_timeout_s, polled so that signal handlers stay responsive meanwhile.
            self._executor.shutdown(wait=False, cancel_futures=True)
            while self._executor.busy and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            if self._executor.busy:
                log.warning("%d backend call(s) still running after stop_timeout_s (%g s): left behind",
                            self._executor.busy, self.limits.stop_timeout_s)
            self._executor = None
        try:
            self.backend.close(timeout=self._stop_time_left())
        except Exception:  # the stop goes on: statuses are out, files closed
            log.exception("the %s backend failed to close", self.backend.name)

    def _warm_up(self) -> None:
        t0 = time.perf_counter()
        Session.warm_up()
        self.backend.warm_up()
        log.info("warm-up took %.2f s", time.perf_counter() - t0)
