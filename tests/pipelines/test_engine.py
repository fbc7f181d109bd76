"""The batch seam on both engines: same results, bounded retries, dead workers, no hang.

Ray tests share one local 2-CPU Ray session (``ray_cluster`` in tests/conftest.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from pipelines.engine import Outcome, WorkerInitError, run_items


# Per-item functions live at module level so that pool processes and Ray workers can import them.
def _make_worker(state: Path, init_fails: bool = False) -> Callable[[Any], Any]:
    """Counts its loads in ``state/loads`` (one line per worker process)."""
    if init_fails:
        raise OSError("model file is corrupt")
    state.mkdir(parents=True, exist_ok=True)
    with (state / "loads").open("a") as f:
        f.write(f"{os.getpid()}\n")
    return partial(_work, state)


def _work(state: Path, item: Any) -> dict[str, Any]:
    """``("raise", k)`` always raises; ``("die", k)`` kills its process; ``"once-"`` variants
    do it only on the first try (a marker file remembers); ``("sleep", s)`` sleeps."""
    kind, k = item
    marker = state / f"{kind}-{k}"
    first = not marker.exists()
    marker.touch()
    if kind == "raise" or (kind == "once-raise" and first):
        raise ValueError(f"bad item {k}")
    if kind == "die" or (kind == "once-die" and first):
        os._exit(1)
    if kind == "sleep":
        time.sleep(k)
    if kind == "once-hang" and first:
        time.sleep(3600)
    return {"k": k, "square": k * k}


def _make_thread_probe() -> Callable[[Any], Any]:
    return _thread_probe


def _thread_probe(item: Any) -> dict[str, Any]:
    """What the worker process was given: torch's threads, the OpenMP/BLAS pools, the env."""
    import torch
    from threadpoolctl import threadpool_info

    return {
        "torch": torch.get_num_threads(),
        "pools": sorted({p["num_threads"] for p in threadpool_info()}),
        "omp": os.environ.get("OMP_NUM_THREADS"),
    }


def _collect(outs: Iterator[Outcome[Any]]) -> dict[Any, Outcome[Any]]:
    return {o.item: o for o in outs}


def _loads(state: Path) -> int:
    return len((state / "loads").read_text().splitlines())


ENGINES = [
    pytest.param("local", 1, id="local1"),
    pytest.param("local", 2, id="local2"),
    pytest.param("ray", 2, id="ray2", marks=[pytest.mark.integration]),
]


@pytest.mark.parametrize(("engine", "workers"), ENGINES)
def test_results_retries_and_dead_workers(
    engine: str, workers: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if engine == "ray":
        request.getfixturevalue("ray_cluster")
    if engine == "local" and workers == 1:
        items = [("ok", k) for k in range(6)] + [("raise", 7), ("once-raise", 8)]
    else:  # a dying item would kill the test process itself in inline mode
        items = [("ok", k) for k in range(6)] + [
            ("raise", 7),
            ("once-raise", 8),
            ("die", 9),
            ("once-die", 10),
        ]
    got = _collect(
        run_items(
            items, partial(_make_worker, tmp_path), engine=engine, workers=workers, max_retries=2
        )
    )
    assert set(got) == set(items)
    for k in range(6):
        o = got[("ok", k)]
        assert o.ok and o.value == {"k": k, "square": k * k}
        assert items[o.index] == ("ok", k)
    bad = got[("raise", 7)]
    assert (bad.ok, bad.attempts, bad.worker_died) == (False, 3, False)
    assert bad.error == "ValueError: bad item 7"
    assert got[("once-raise", 8)].ok and got[("once-raise", 8)].attempts == 2
    if ("die", 9) in got:
        dead = got[("die", 9)]
        assert (dead.ok, dead.attempts, dead.worker_died) == (False, 3, True)
        assert "died" in dead.error
        assert got[("once-die", 10)].ok and got[("once-die", 10)].value["square"] == 100
    # a dead worker is replaced (Ray: that actor; local: the whole pool, at most 5 times here)
    replaced = (4 if engine == "ray" else 5 * workers) if ("die", 9) in got else 0
    assert _loads(tmp_path) <= workers + replaced


@pytest.mark.parametrize(("engine", "workers"), ENGINES[1:])
def test_the_worker_is_loaded_once_per_process_not_per_item(
    engine: str, workers: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if engine == "ray":
        request.getfixturevalue("ray_cluster")
    items = [("ok", k) for k in range(10)]
    got = list(run_items(items, partial(_make_worker, tmp_path), engine=engine, workers=workers))
    assert sorted(o.value["k"] for o in got) == list(range(10))
    pids = set((tmp_path / "loads").read_text().split())
    assert len(pids) == _loads(tmp_path) <= workers


@pytest.mark.parametrize(("engine", "workers"), ENGINES)
def test_init_failure_is_one_clear_error(
    engine: str, workers: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if engine == "ray":
        request.getfixturevalue("ray_cluster")
    with pytest.raises(WorkerInitError, match="model file is corrupt"):
        list(
            run_items(
                [("ok", 1), ("ok", 2)],
                partial(_make_worker, tmp_path, init_fails=True),
                engine=engine,
                workers=workers,
            )
        )


@pytest.mark.integration
def test_ray_item_timeout_kills_the_worker_and_the_job_finishes(
    ray_cluster: None, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    got = _collect(
        run_items(
            [("sleep", 60), ("ok", 2), ("ok", 3)],
            partial(_make_worker, tmp_path),
            engine="ray",
            workers=2,
            max_retries=0,
            item_timeout=2.0,
        )
    )
    assert time.monotonic() - t0 < 45
    slow = got[("sleep", 60)]
    assert (slow.ok, slow.worker_died) == (False, True) and "timed out" in slow.error
    assert got[("ok", 2)].ok and got[("ok", 3)].ok


def test_local_item_timeout_stops_a_hung_item_and_the_job_finishes(tmp_path: Path) -> None:
    """A hung item's process is killed, the item retried, then failed; the others finish.
    One worker runs in a child process when there is a timeout (a hung item cannot be stopped
    in this one)."""
    items = [("sleep", 3600), ("once-hang", 1), ("ok", 2), ("ok", 3)]
    t0 = time.monotonic()
    got = _collect(
        run_items(
            items, partial(_make_worker, tmp_path), workers=1, max_retries=1, item_timeout=1.5
        )
    )
    assert time.monotonic() - t0 < 60
    hung = got[("sleep", 3600)]
    assert (hung.ok, hung.attempts, hung.worker_died) == (False, 2, True)
    assert hung.error == "timed out after 1.5 s"
    again = got[("once-hang", 1)]  # hung once, then fine on a fresh worker
    assert again.ok and again.attempts == 2 and again.value["square"] == 1
    assert got[("ok", 2)].ok and got[("ok", 3)].ok
    assert all(o.attempts == 1 for o in (got[("ok", 2)], got[("ok", 3)]))
    assert os.getpid() not in {int(x) for x in (tmp_path / "loads").read_text().split()}


def test_local_item_timeout_excludes_worker_start_up(tmp_path: Path) -> None:
    """A worker whose model takes longer to load than item_timeout still runs its items."""
    got = list(
        run_items(
            [("ok", 1), ("ok", 2)],
            partial(_make_slow_worker, tmp_path, 3.0),
            workers=2,
            item_timeout=2.0,
        )
    )
    assert all(o.ok and o.attempts == 1 for o in got)


def _make_slow_worker(state: Path, load_s: float) -> Callable[[Any], Any]:
    time.sleep(load_s)
    return _make_worker(state)


def test_worker_processes_share_the_cores() -> None:
    """Each of 2 pool processes gets cores // 2 compute threads, set in the environment before
    the worker loads torch (and in torch and the OpenMP/BLAS pools had they been loaded)."""
    from pipelines.engine import available_cpus

    want = max(1, available_cpus() // 2)
    got = list(run_items([1, 2, 3, 4], _make_thread_probe, workers=2))
    for o in got:
        assert o.ok, o.error
        assert o.value == {"torch": want, "pools": [want], "omp": str(want)}


def test_limit_threads_caps_loaded_pools() -> None:
    """In a process where torch and its OpenMP pool are already loaded (a Ray actor, a pool
    process whose parent module imported them)."""
    import subprocess
    import sys

    code = (
        "import torch, numpy; from pipelines.engine import limit_threads; "
        "from threadpoolctl import threadpool_info; limit_threads(1); "
        "print(torch.get_num_threads(), {p['num_threads'] for p in threadpool_info()})"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split(None, 1) == ["1", "{1}\n"]


def test_threads_per_worker_rule() -> None:
    from pipelines.engine import threads_per_worker

    assert [threads_per_worker(w, cpus=8) for w in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    assert threads_per_worker(2, cpus=2) == 1


def test_closing_early_stops_cleanly(tmp_path: Path) -> None:
    gen = run_items([("ok", k) for k in range(8)], partial(_make_worker, tmp_path), workers=2)
    first = next(iter(gen))
    assert first.ok
    gen.close()  # what an interrupted caller does; must not hang or raise


def test_an_unreachable_ray_address_fails_fast(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="nothing answers"):
        list(
            run_items(
                [("ok", 1)],
                partial(_make_worker, tmp_path),
                engine="ray",
                ray_address="127.0.0.1:1",
            )
        )
    assert time.monotonic() - t0 < 30  # ray.init alone would retry for minutes


def test_bad_arguments(tmp_path: Path) -> None:
    mk = partial(_make_worker, tmp_path)
    with pytest.raises(ValueError, match="engine"):
        run_items([1], mk, engine="spark")
    with pytest.raises(ValueError, match="workers"):
        run_items([1], mk, workers=0)
    with pytest.raises(ValueError, match="max_retries"):
        run_items([1], mk, max_retries=-1)
    with pytest.raises(ValueError, match="item_timeout"):
        run_items([1], mk, item_timeout=0)
    with pytest.raises(ValueError, match="threads"):
        run_items([1], mk, threads=0)
    assert list(run_items([], mk, engine="ray")) == []
