"""One execution seam for batch jobs: the same per-item function on a local process pool or Ray.

``run_items(items, make_worker, engine=..., workers=...)`` calls ``make_worker()`` **once per
worker process** (it loads the model and returns the per-item callable), then feeds it items and
yields an :class:`Outcome` for each item *as it completes*, so the caller can update its manifest
after every item. Workers write their (large) outputs themselves and return small records.

* ``engine="local"`` (default): ``workers=1`` runs in this process (in one child process with
  ``item_timeout``); ``workers>1`` runs ``spawn``-ed worker processes, each fed one item at a
  time over its own pipe.
* ``engine="ray"``: ``workers`` actors (one CPU each, ``cpus_per_worker`` to change). With
  ``ray_address`` it joins that cluster (``ray.init(address=...)``); otherwise it starts a small
  local one and shuts it down at the end. A Ray session that is already initialised is reused.

Each worker process caps its compute threads (torch, OpenMP, MKL, OpenBLAS) at its share of the
cores (:func:`threads_per_worker`) before it loads its model: two workers that each use every
core only slow each other down.

Fault tolerance (both engines): an item that raises is retried up to ``max_retries`` times, then
yielded as failed with its reason. A worker process that dies (``os._exit``, OOM kill, segfault)
or runs one item past ``item_timeout`` (it is killed) charges that item, which is retried on a
fresh worker, then failed ("worker died ..." / "timed out after N s"). The job always finishes.
If ``make_worker`` itself raises, nothing can run: :class:`WorkerInitError` is raised.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

log = logging.getLogger(__name__)

T = TypeVar("T")
ENGINES: tuple[str, ...] = ("local", "ray")
WorkerFactory = Callable[[], Callable[[Any], Any]]


def check_engine_options(engine: str, ray_address: str | None) -> None:
    """The CLI's ``--engine`` / ``--ray-address`` pair, checked the same way by every batch
    command; raises :class:`~pipelines.errors.UserError`."""
    from pipelines.errors import UserError

    if engine not in ENGINES:
        raise UserError(f"--engine must be {' or '.join(ENGINES)} (got {engine!r})")
    if ray_address is not None and engine != "ray":
        raise UserError("--ray-address needs --engine ray")


class WorkerInitError(RuntimeError):
    """``make_worker()`` failed (e.g. the model cannot be loaded): no item can run."""


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """What happened to one item: ``value`` when ``ok``, else ``error`` (``kind: message``)."""

    index: int
    item: T
    ok: bool
    value: Any = None
    error: str = ""
    attempts: int = 1
    worker_died: bool = False


# What a worker needs to find Vigil's stores and offline weights; a joined Ray cluster does not
# inherit this process's environment, so callers pass these through ``env``.
SETTINGS_ENV = ("VIGIL_HOME", "MLFLOW_TRACKING_URI", "TORCH_HOME", "HF_HUB_OFFLINE")


def settings_env() -> dict[str, str]:
    """The :data:`SETTINGS_ENV` variables set in this process."""
    return {k: os.environ[k] for k in SETTINGS_ENV if k in os.environ}


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def validate(engine: str, workers: int, max_retries: int) -> None:
    """Reject bad arguments with a ``ValueError`` that names them."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")


def run_items(
    items: Sequence[T],
    make_worker: WorkerFactory,
    *,
    engine: str = "local",
    workers: int = 1,
    ray_address: str | None = None,
    max_retries: int = 2,
    item_timeout: float | None = None,
    cpus_per_worker: float = 1.0,
    threads: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[Outcome[T]]:
    """Run ``make_worker()(item)`` for every item; yield outcomes in completion order.

    ``make_worker`` must be picklable (a module-level function, class or ``functools.partial``
    of one). ``env`` is set in each worker process before ``make_worker`` runs (e.g. the MLflow
    tracking URI, which a joined cluster does not inherit). ``item_timeout`` (seconds) kills
    the worker process of an item that runs longer (start-up excluded); the item is retried,
    then failed with "timed out after N s". With ``item_timeout`` one local worker runs in a
    child process too: a hung item cannot be stopped inside this one.
    ``threads``: compute threads per worker process (torch, OpenMP, MKL, OpenBLAS), set before
    ``make_worker`` runs; default :func:`threads_per_worker` (cores // workers) locally and
    ``cpus_per_worker`` on Ray. The in-process worker (local, one worker) is left as it is.
    Closing the generator early (the caller was interrupted) stops the workers; outcomes not
    yet yielded are simply not done.
    """
    validate(engine, workers, max_retries)
    if item_timeout is not None and item_timeout <= 0:
        raise ValueError(f"item_timeout must be > 0, got {item_timeout}")
    if cpus_per_worker <= 0:
        raise ValueError(f"cpus_per_worker must be > 0, got {cpus_per_worker}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if not items:
        return iter(())
    if engine == "ray":
        return _run_ray(
            items,
            make_worker,
            workers,
            ray_address,
            max_retries,
            item_timeout,
            cpus_per_worker,
            threads or max(1, int(cpus_per_worker)),
            env,
        )
    if workers == 1 and item_timeout is None:
        return _run_inline(items, make_worker, max_retries, env)
    threads = threads or threads_per_worker(workers)
    return _run_pool(items, make_worker, workers, max_retries, item_timeout, threads, env)


# --------------------------------------------------------------------------- threads
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_worker(workers: int, cpus: int | None = None) -> int:
    """The rule: ``workers`` processes share the cores equally, at least one thread each (two
    workers that each use every core only fight over them)."""
    return max(1, (cpus or available_cpus()) // max(1, workers))


def limit_threads(n: int) -> None:
    """Cap this process's compute threads at ``n``: torch's intra-op pool and the OpenMP / MKL /
    OpenBLAS pools, those already loaded (threadpoolctl) and those loaded later (environment)."""
    from threadpoolctl import threadpool_limits

    for name in _THREAD_ENV:
        os.environ[name] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
    threadpool_limits(n)


# --------------------------------------------------------------------------- local engines
def _load(make_worker: WorkerFactory, env: Mapping[str, str] | None) -> Callable[[Any], Any]:
    if env:
        os.environ.update(env)
    try:
        return make_worker()
    except Exception as exc:
        raise WorkerInitError(f"worker could not start: {_describe(exc)}") from exc


def _try(fn: Callable[[Any], Any], item: Any) -> tuple[bool, Any]:
    """(True, value) or (False, reason): an item's exception never leaves the worker."""
    try:
        return True, fn(item)
    except Exception as exc:
        log.warning("item failed: %s", _describe(exc))
        return False, _describe(exc)


def _run_inline(
    items: Sequence[T], make_worker: WorkerFactory, max_retries: int, env: Mapping[str, str] | None
) -> Iterator[Outcome[T]]:
    fn = _load(make_worker, env)
    for i, item in enumerate(items):
        attempt = 0
        while True:
            attempt += 1
            ok, payload = _try(fn, item)
            if ok:
                yield Outcome(i, item, True, payload, attempts=attempt)
                break
            if attempt > max_retries:
                yield Outcome(i, item, False, error=payload, attempts=attempt)
                break


def _pool_worker(
    conn: Connection, make_worker: WorkerFactory, env: Mapping[str, str] | None, threads: int
) -> None:
    """A pool process: load the worker, say ``("ready", pid)``, then answer every
    ``(index, item)`` with ``(index, ok, value-or-reason)`` until told ``None``."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops its workers
    limit_threads(threads)
    try:
        fn = _load(make_worker, env)
    except WorkerInitError as exc:
        conn.send(("init-error", str(exc)))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if msg is None:
            return
        i, item = msg
        ok, payload = _try(fn, item)
        try:
            conn.send((i, ok, payload))
        except Exception as exc:  # e.g. a value that cannot be pickled
            conn.send((i, False, f"result could not be sent back: {_describe(exc)}"))


@dataclass
class _Proc:
    """One pool process and what it is doing: starting (not ``ready``), idle or one item."""

    process: Any  # multiprocessing.context.SpawnProcess
    conn: Connection
    since: float  # when it started, or when its current item was handed over
    ready: bool = False
    item: int | None = None


def _run_pool(
    items: Sequence[T],
    make_worker: WorkerFactory,
    workers: int,
    max_retries: int,
    item_timeout: float | None,
    threads: int,
    env: Mapping[str, str] | None,
) -> Iterator[Outcome[T]]:
    """``workers`` spawned processes, each fed one item at a time over its own pipe, so the
    parent always knows which item a process runs: a process that dies or runs past
    ``item_timeout`` (then it is killed) charges exactly that item, and a new process takes
    its place. Start-up (loading the model) does not count towards ``item_timeout``."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")  # torch + fork is unsafe
    queue: deque[int] = deque(range(len(items)))
    tries = [0] * len(items)
    procs: list[_Proc | None] = [None] * min(workers, len(items))
    restarts, max_restarts = 0, workers + len(items) * (max_retries + 1)

    def start(slot: int) -> None:
        parent, child = ctx.Pipe()
        p = ctx.Process(
            target=_pool_worker,
            args=(child, make_worker, env, threads),
            name=f"vigil-worker-{slot}",
            daemon=True,
        )
        p.start()
        child.close()  # only the child holds its end: the parent sees EOF when it dies
        procs[slot] = _Proc(p, parent, time.monotonic())

    def stop(proc: _Proc) -> None:
        if proc.item is None and proc.process.is_alive():
            try:
                proc.conn.send(None)  # idle: let it exit on its own
                proc.process.join(timeout=5)
            except OSError:
                pass
        if proc.process.is_alive():
            proc.process.kill()
            proc.process.join(timeout=5)
        proc.conn.close()

    def settle(i: int, ok: bool, payload: Any, died: bool) -> Outcome[T] | None:
        """The outcome to yield, or None when the item goes back in the queue for a retry."""
        if ok:
            return Outcome(i, items[i], True, payload, attempts=tries[i])
        if tries[i] > max_retries:
            return Outcome(i, items[i], False, error=payload, attempts=tries[i], worker_died=died)
        queue.append(i)
        return None

    def lost(slot: int, reason: str | None = None) -> Outcome[T] | None:
        """Process ``slot`` died (or was killed for ``reason``): charge its item, replace it."""
        nonlocal restarts
        proc = procs[slot]
        assert proc is not None
        stop(proc)
        procs[slot] = None
        if not proc.ready:
            raise WorkerInitError(
                f"worker process exited while starting (exit code {proc.process.exitcode})"
            )
        out = None
        if proc.item is not None:
            i = proc.item
            why = reason or f"worker died: its process exited (exit code {proc.process.exitcode})"
            log.warning("item %d: %s", i, why)
            out = settle(i, False, why, True)
        restarts += 1
        if restarts > max_restarts:
            raise RuntimeError("worker processes keep dying; giving up")
        return out  # the main loop starts a new process in this slot if work remains

    startup_timeout = 600.0  # loading a model on a busy machine can be slow, but not forever
    try:
        for slot in range(len(procs)):
            start(slot)
        while True:
            free = sum(1 for p in procs if p is not None and p.item is None)
            for slot, proc in enumerate(procs):
                if proc is None and len(queue) > free:  # a slot left empty by a dead process
                    start(slot)
                    free += 1
                elif proc is not None and proc.ready and proc.item is None and queue:
                    i = queue.popleft()
                    try:
                        proc.conn.send((i, items[i]))
                    except OSError:  # it died while idle: the sentinel below says so
                        queue.appendleft(i)
                        continue
                    tries[i] += 1
                    proc.item, proc.since = i, time.monotonic()
            live = [(s, p) for s, p in enumerate(procs) if p is not None]
            if not queue and not any(p.item is not None for _, p in live):
                break
            timers = [p.since + startup_timeout for _, p in live if not p.ready]
            if item_timeout is not None:
                timers += [p.since + item_timeout for _, p in live if p.item is not None]
            ready = wait(
                [p.conn for _, p in live] + [p.process.sentinel for _, p in live],
                timeout=max(0.0, min(timers) - time.monotonic()) if timers else None,
            )
            for slot, proc in live:
                if proc.conn not in ready and proc.process.sentinel not in ready:
                    continue
                dead = False
                try:
                    msg = proc.conn.recv() if proc.conn.poll() else None
                except (EOFError, OSError):  # its end of the pipe closed: the process exited
                    msg, dead = None, True
                if msg is None:
                    if dead or not proc.process.is_alive():
                        out = lost(slot)
                        if out is not None:
                            yield out
                    continue
                if msg[0] == "ready":
                    proc.ready = True
                elif msg[0] == "init-error":
                    raise WorkerInitError(msg[1])
                else:
                    i, ok, payload = msg
                    proc.item = None
                    if not ok:
                        log.warning("item %d failed (try %d): %s", i, tries[i], payload)
                    out = settle(i, ok, payload, False)
                    if out is not None:
                        yield out
            now = time.monotonic()
            for slot, proc in enumerate(procs):
                if proc is None:
                    continue
                if not proc.ready and now - proc.since > startup_timeout:
                    raise WorkerInitError(f"a worker did not start within {startup_timeout} s")
                if proc.item is not None and item_timeout and now - proc.since > item_timeout:
                    log.warning(
                        "item %d ran past %s s: killing its worker", proc.item, item_timeout
                    )
                    proc.process.kill()
                    out = lost(slot, f"timed out after {item_timeout:g} s")
                    if out is not None:
                        yield out
    finally:
        for proc in procs:
            if proc is not None:
                stop(proc)


# --------------------------------------------------------------------------- Ray
class _RayWorker:
    """Ray actor body: loads the worker once, then runs items."""

    def __init__(
        self, make_worker: WorkerFactory, env: Mapping[str, str] | None, threads: int
    ) -> None:
        limit_threads(threads)
        self.fn = _load(make_worker, env)

    def ready(self) -> int:
        return os.getpid()

    def run(self, item: Any) -> tuple[bool, Any]:
        return _try(self.fn, item)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a ``host:port`` nobody answers on: ``ray.init`` would retry for minutes."""
    import socket

    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(
            f"cannot join the Ray cluster at {address}: nothing answers there ({exc})"
        ) from None


def _ray_start(ray_address: str | None, workers: int) -> bool:
    """Join or start Ray; True when this call did (``ray.shutdown`` then disconnects, and stops
    the local instance it started; a joined cluster keeps running)."""
    import ray

    if ray_address:
        _check_reachable(ray_address)
    if ray.is_initialized():
        return False
    if ray_address:
        try:
            ray.init(address=ray_address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            root: BaseException = exc
            while root.__cause__ is not None:
                root = root.__cause__
            why = str(root).strip().splitlines()[-1][:400] if str(root).strip() else repr(root)
            hint = ""
            if "auth" in why.lower():
                hint = (
                    " (the cluster uses token authentication: export RAY_AUTH_MODE=token and "
                    "make its token available as ~/.ray/auth_token or RAY_AUTH_TOKEN)"
                )
            raise ConnectionError(
                f"cannot join the Ray cluster at {ray_address}: {why}{hint}"
            ) from exc
    else:
        start_local_ray(workers)
    return True


def start_local_ray(num_cpus: int) -> bool:
    """Start a new local Ray instance with ``num_cpus`` CPUs unless Ray is already initialised;
    True when this call started it (the caller then owns ``ray.shutdown``)."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(
        address="local",  # a new local instance, never a cluster found on this host
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=100 * 2**20,  # records are small; outputs go to disk
        log_to_driver=False,
        configure_logging=False,
    )
    return True


def _run_ray(
    items: Sequence[T],
    make_worker: WorkerFactory,
    workers: int,
    ray_address: str | None,
    max_retries: int,
    item_timeout: float | None,
    cpus_per_worker: float,
    threads: int,
    env: Mapping[str, str] | None,
) -> Iterator[Outcome[T]]:
    import ray
    from ray.exceptions import RayActorError, RayError

    started = _ray_start(ray_address, workers)
    actor_cls: Any = ray.remote(num_cpus=cpus_per_worker, max_restarts=0, max_task_retries=0)(
        _RayWorker
    )
    fn_ref = ray.put(make_worker)
    queue: deque[int] = deque(range(len(items)))
    tries = [0] * len(items)
    actors: list[Any] = []
    running: dict[Any, tuple[int, int, float]] = {}  # ref -> (item, actor slot, start time)
    timed_out: set[Any] = set()
    startup_timeout = 600.0  # loading a model on a busy node can be slow, but not forever
    restarts = 0
    max_restarts = workers + len(items) * (max_retries + 1)  # every try may kill a worker

    starting: dict[Any, tuple[int, float]] = {}  # ready() ref -> (actor slot, start time)

    def start(slot: int) -> None:
        """A new actor in ``slot``; it takes items once its ``ready()`` (worker loaded) returns."""
        actor = actor_cls.remote(fn_ref, dict(env) if env else None, threads)
        if slot < len(actors):
            actors[slot] = actor
        else:
            actors.append(actor)
        starting[actor.ready.remote()] = (slot, time.monotonic())

    def started_ok(ref: Any) -> int:
        slot, _ = starting.pop(ref)
        try:
            ray.get(ref)
        except RayError as exc:
            cause = getattr(exc, "error_msg", "") or str(exc)
            raise WorkerInitError(f"Ray worker could not start: {cause[:800]}") from None
        return slot

    def submit(slot: int) -> None:
        i = queue.popleft()
        tries[i] += 1
        running[actors[slot].run.remote(items[i])] = (i, slot, time.monotonic())

    def settle(i: int, ok: bool, payload: Any, died: bool) -> Outcome[T] | None:
        if ok:
            return Outcome(i, items[i], True, payload, attempts=tries[i])
        if tries[i] > max_retries:
            return Outcome(i, items[i], False, error=payload, attempts=tries[i], worker_died=died)
        queue.append(i)
        return None

    try:
        for slot in range(min(workers, len(items))):
            start(slot)
        idle: list[int] = []
        while queue or running:
            while queue and idle:
                submit(idle.pop())
            done, _ = ray.wait([*running, *starting], num_returns=1, timeout=1.0)
            for ref in [r for r in done if r in starting]:
                idle.append(started_ok(ref))
            done = [r for r in done if r in running]
            for _ref, (_, t0) in starting.items():
                if time.monotonic() - t0 > startup_timeout:
                    raise WorkerInitError(f"a Ray worker did not start within {startup_timeout} s")
            if item_timeout is not None:
                now = time.monotonic()
                for ref, (i, slot, t0) in running.items():
                    if ref not in timed_out and now - t0 > item_timeout:
                        log.warning("item %d ran past %s s: killing its worker", i, item_timeout)
                        timed_out.add(ref)
                        ray.kill(actors[slot])  # its task now fails with RayActorError
            for ref in done:
                i, slot, _ = running.pop(ref)
                try:
                    ok, payload = ray.get(ref)
                except RayActorError as exc:
                    if ref in timed_out:
                        reason = f"timed out after {item_timeout:g} s"
                    else:
                        reason = f"worker died: {_describe(exc).splitlines()[0]}"
                    log.warning("item %d: %s", i, reason)
                    out = settle(i, False, reason, True)
                    if out is not None:
                        yield out
                    restarts += 1
                    if restarts > max_restarts:
                        raise RuntimeError("Ray workers keep dying; giving up") from exc
                    ray.kill(actors[slot])
                    start(slot)
                    continue
                except RayError as exc:  # object lost, owner died...: retried like a crash
                    ok, payload = False, f"ray error: {_describe(exc)}"
                    out = settle(i, ok, payload, True)
                else:
                    if not ok:
                        log.warning("item %d failed (try %d): %s", i, tries[i], payload)
                    out = settle(i, ok, payload, False)
                idle.append(slot)
                if out is not None:
                    yield out
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()
