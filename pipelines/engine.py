"""One execution seam for batch jobs: the same per-item function on a local process pool or Ray.

``run_items(items, make_worker, engine=..., workers=...)`` calls ``make_worker()`` **once per
worker process** (it loads the model and returns the per-item callable), then feeds it items and
yields an :class:`Outcome` for each item *as it completes*, so the caller can update its manifest
after every item. Workers write their (large) outputs themselves and return small records.

* ``engine="local"`` (default): ``workers=1`` runs in this process; ``workers>1`` uses a
  ``spawn`` process pool whose processes cache their worker on first use.
* ``engine="ray"``: ``workers`` actors (one CPU each, ``cpus_per_worker`` to change). With
  ``ray_address`` it joins that cluster (``ray.init(address=...)``); otherwise it starts a small
  local one and shuts it down at the end. A Ray session that is already initialised is reused.

Fault tolerance (both engines): an item that raises is retried up to ``max_retries`` times, then
yielded as failed with its reason. A worker process that dies (``os._exit``, OOM kill, segfault;
on Ray also an item running past ``item_timeout``) takes the items it was running with it: they
are retried on a fresh worker, then failed. The job always finishes. Locally a dead process breaks
the whole pool: the items in flight are not charged but re-run one at a time, so only the item
that kills its process is charged for it.
If ``make_worker`` itself raises, nothing can run: :class:`WorkerInitError` is raised.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
ENGINES: tuple[str, ...] = ("local", "ray")
WorkerFactory = Callable[[], Callable[[Any], Any]]


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
    env: Mapping[str, str] | None = None,
) -> Iterator[Outcome[T]]:
    """Run ``make_worker()(item)`` for every item; yield outcomes in completion order.

    ``make_worker`` must be picklable (a module-level function, class or ``functools.partial``
    of one). ``env`` is set in each worker process before ``make_worker`` runs (e.g. the MLflow
    tracking URI, which a joined cluster does not inherit). ``item_timeout`` (seconds, Ray
    only) kills the actor of an item that runs longer; the item then counts as a dead worker.
    Closing the generator early (the caller was interrupted) stops the workers; outcomes not
    yet yielded are simply not done.
    """
    validate(engine, workers, max_retries)
    if item_timeout is not None and item_timeout <= 0:
        raise ValueError(f"item_timeout must be > 0, got {item_timeout}")
    if cpus_per_worker <= 0:
        raise ValueError(f"cpus_per_worker must be > 0, got {cpus_per_worker}")
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
            env,
        )
    if workers == 1:
        return _run_inline(items, make_worker, max_retries, env)
    return _run_pool(items, make_worker, workers, max_retries, env)


# --------------------------------------------------------------------------- local engines
_WORKER: Callable[[Any], Any] | None = None  # per pool process (each pool is fresh per job)


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


def _pool_call(make_worker: WorkerFactory, env: Mapping[str, str] | None, item: Any) -> Any:
    global _WORKER
    if _WORKER is None:
        _WORKER = _load(make_worker, env)  # WorkerInitError propagates: the job cannot run
    return _try(_WORKER, item)


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


def _run_pool(
    items: Sequence[T],
    make_worker: WorkerFactory,
    workers: int,
    max_retries: int,
    env: Mapping[str, str] | None,
) -> Iterator[Outcome[T]]:
    """A dead process breaks the whole pool and fails every item in flight, so the culprit is
    unknown. Those items are not charged; they are re-run one at a time ("suspects"), where a
    crash can only be the item's own doing."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    queue: deque[int] = deque(range(len(items)))
    suspects: deque[int] = deque()
    tries = [0] * len(items)
    ctx = mp.get_context("spawn")  # torch + fork is unsafe
    pool = ProcessPoolExecutor(workers, mp_context=ctx)
    running: dict[Future[Any], int] = {}

    def submit(i: int) -> None:
        tries[i] += 1
        running[pool.submit(_pool_call, make_worker, env, items[i])] = i

    def settle(i: int, ok: bool, payload: Any, died: bool) -> Outcome[T] | None:
        """The outcome to yield, or None when the item goes back in the queue for a retry."""
        if ok:
            return Outcome(i, items[i], True, payload, attempts=tries[i])
        if tries[i] > max_retries:
            return Outcome(i, items[i], False, error=payload, attempts=tries[i], worker_died=died)
        (suspects if died else queue).append(i)
        return None

    try:
        while queue or suspects or running:
            if suspects:
                if not running:
                    submit(suspects.popleft())  # alone: nothing else can take the blame
            else:
                while queue and len(running) < workers:
                    submit(queue.popleft())
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            finished: list[tuple[int, bool, Any]] = []
            broken, lost = False, []
            for fut in done:
                i = running.pop(fut)
                try:
                    ok, payload = fut.result()
                    finished.append((i, ok, payload))
                except BrokenProcessPool:
                    broken = True
                    finished.append((i, False, None))
            if broken:
                # every other in-flight item fails with the pool: collect them too
                for fut, i in list(running.items()):
                    try:
                        ok, payload = fut.result()
                        finished.append((i, ok, payload))
                    except BrokenProcessPool:
                        finished.append((i, False, None))
                running.clear()
                pool.shutdown(wait=True, cancel_futures=True)
                pool = ProcessPoolExecutor(workers, mp_context=ctx)
                lost = [i for i, ok, payload in finished if not ok and payload is None]
                log.warning("a worker process died while running items %s; new pool", lost)
            for i, ok, payload in finished:
                if payload is None and not ok:  # lost with the pool
                    if len(lost) > 1:
                        tries[i] -= 1  # culprit unknown: not charged, re-run alone
                        suspects.append(i)
                        continue
                    payload = "worker died: the process running this item exited"
                    out = settle(i, False, payload, True)
                else:
                    out = settle(i, ok, payload, False)
                if out is not None:
                    yield out
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- Ray
class _RayWorker:
    """Ray actor body: loads the worker once, then runs items."""

    def __init__(self, make_worker: WorkerFactory, env: Mapping[str, str] | None) -> None:
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
        actor = actor_cls.remote(fn_ref, dict(env) if env else None)
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
                        reason = f"timed out after {item_timeout} s"
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
