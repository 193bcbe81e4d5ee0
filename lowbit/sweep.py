"""Run independent jobs in this process, in local worker processes, or on a Ray cluster.

``run_jobs(fn, jobs, workers=..., ray_address=...)`` returns ``[fn(job) for job in jobs]``
(``fn(shared, job)`` with ``shared``), in job order, wherever the jobs ran:

- ``workers=1`` and no Ray: a plain loop in this process;
- ``workers=N > 1``: N local processes started with "spawn" (forking a process that has
  run PyTorch can deadlock in its thread pools), each limited to its share of this
  process's PyTorch threads, so N workers never oversubscribe the cores;
- ``ray_address``: one Ray task per job (``num_cpus=1``, one PyTorch thread each), on
  ``"local"`` (a Ray instance started here, with ``workers`` CPUs when ``workers > 1``,
  shut down afterwards), ``"auto"`` (the cluster this machine belongs to), ``"HOST:PORT"``
  (a cluster's head node) or ``"ray://HOST:PORT"`` (Ray Client). Ray is an optional extra:
  ``pip install 'lowbit[ray]'``. The cluster's nodes need lowbit (the same version) and
  whatever module defines the model.

``fn`` and the jobs travel by pickle: ``fn`` must be a module-level function and the jobs
plain data (numbers, strings, tensors, state dicts); no lambdas. ``shared`` is sent once
per worker process (once to the Ray object store), not once per job: put what every job
needs (a model, the calibration images) there and keep the jobs small.

A job that raises stops the sweep with a ``SweepError`` naming the job (its index and a
short repr) and the error; the remote traceback is kept in ``SweepError.remote_traceback``.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import reprlib
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from .errors import LowbitError

__all__ = ["run_jobs", "SweepError", "RAY_INSTALL_HINT"]

RAY_INSTALL_HINT = "pip install 'lowbit[ray]'"


class _NoShared:
    """Marks "fn takes the job alone"; stays the one instance through pickle."""

    def __reduce__(self):
        return "_NO_SHARED"


_NO_SHARED = _NoShared()


class SweepError(LowbitError, RuntimeError):
    """A job of a sweep failed, or its workers could not be started or reached."""

    def __init__(self, message: str, remote_traceback: str | None = None):
        super().__init__(message)
        self.remote_traceback = remote_traceback


def _label(index: int, job: Any) -> str:
    return f"job {index} {reprlib.repr(job)}"


def _call(fn: Callable, shared: Any, index: int, job: Any) -> tuple[bool, Any]:
    """``(True, result)`` or ``(False, (error line, traceback))``: exceptions come back as
    text, so an exception class the main process cannot unpickle never hides the error."""
    try:
        return True, fn(job) if shared is _NO_SHARED else fn(shared, job)
    except Exception as e:  # reported by the caller with the job's name
        return False, (f"{type(e).__name__}: {e}", traceback.format_exc())


def _unwrap(index: int, job: Any, outcome: tuple[bool, Any]) -> Any:
    ok, value = outcome
    if ok:
        return value
    message, tb = value
    err = SweepError(f"{_label(index, job)} failed: {message}", tb)
    err.add_note(f"the job's traceback:\n{tb}")  # shown with LOWBIT_DEBUG=1
    raise err


def run_jobs(
    fn: Callable,
    jobs: Sequence[Any],
    workers: int = 1,
    ray_address: str | None = None,
    progress: bool = True,
    shared: Any = _NO_SHARED,
    desc: str = "jobs",
) -> list[Any]:
    """``[fn(job) for job in jobs]`` (``fn(shared, job)`` when ``shared`` is given), run
    serially, in ``workers`` local processes or on Ray (see the module docstring).

    >>> run_jobs(abs, [-1, 2, -3], progress=False)
    [1, 2, 3]
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    jobs = list(jobs)
    bar = _bar(len(jobs), progress, desc)
    try:
        if ray_address is not None:
            return _run_ray(fn, jobs, workers, ray_address, shared, bar)
        if workers == 1 or len(jobs) <= 1:
            out = []
            for i, job in enumerate(jobs):
                out.append(_unwrap(i, job, _call(fn, shared, i, job)))
                bar.update(1)
            return out
        return _run_pool(fn, jobs, workers, shared, bar)
    finally:
        bar.close()


def _bar(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="job", disable=not enabled or None, leave=False)


# ----------------------------------------------------------------------------- processes

_WORKER: dict[str, Any] = {}  # per worker process: fn and shared, received once


def _init_worker(threads: int, fn: Callable, shared: Any) -> None:
    import torch

    torch.set_num_threads(threads)
    _WORKER.update(fn=fn, shared=shared)


def _pool_call(index: int, job: Any) -> tuple[bool, Any]:
    return _call(_WORKER["fn"], _WORKER["shared"], index, job)


def _run_pool(fn: Callable, jobs: list, workers: int, shared: Any, bar) -> list[Any]:
    import pickle

    import torch

    for what, obj in (("the job function", fn), ("the shared data", shared), ("a job", jobs)):
        try:  # fail here, with a clear line, rather than inside the pool's feeder thread
            pickle.dumps(obj)
        except Exception as e:
            raise SweepError(
                f"{what} cannot be sent to worker processes ({type(e).__name__}: {e}); use a "
                "module-level function and plain data, or run with workers=1"
            ) from None
    workers = min(workers, len(jobs))
    threads = max(1, torch.get_num_threads() // workers)
    results: list[Any] = [None] * len(jobs)
    pool = cf.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(threads, fn, shared),
    )
    try:
        futures = {pool.submit(_pool_call, i, job): i for i, job in enumerate(jobs)}
        for fut in cf.as_completed(futures):
            i = futures[fut]
            try:
                outcome = fut.result()
            except cf.process.BrokenProcessPool as e:  # a worker died (killed, out of memory)
                raise SweepError(f"a worker process died while running {_label(i, jobs[i])}: "
                                 f"{e}") from None  # fmt: skip
            results[i] = _unwrap(i, jobs[i], outcome)
            bar.update(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


# ----------------------------------------------------------------------------- Ray


def _import_ray():
    try:
        import ray
    except ImportError:
        raise SweepError(f"--ray needs Ray, which is not installed: {RAY_INSTALL_HINT}") from None
    return ray


def _connect_ray(ray, address: str, workers: int) -> bool:
    """Connect (or start, for "local"); True when this call started the connection and
    must shut it down."""
    if ray.is_initialized():
        return False  # the caller's own ray.init() stays as it is
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address == "local":  # Ray's "local": a new instance even where a cluster is known
        if workers > 1:
            kwargs["num_cpus"] = workers
    else:
        _check_reachable(_resolve_auto(address) if address == "auto" else address)
    kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except Exception as e:  # ConnectionError, RuntimeError, ValueError by Ray version
        if address == "local":
            raise SweepError(
                f"cannot start a local Ray instance: {type(e).__name__}: {e}"
            ) from None
        raise SweepError(
            f"cannot connect to Ray at {address}: {type(e).__name__}: {e} (this machine's Ray "
            "must match the cluster's version, and a cluster with token authentication needs "
            "its token: see Ray's docs, ray-security/token-auth)"
        ) from None
    return True


def _resolve_auto(address: str) -> str:
    """The HOST:PORT "auto" stands for ($RAY_ADDRESS, else the last `ray start` on this
    machine), or "auto" when unknown. Ray's own lookup is private API: any failure of it
    only skips the check."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        found = canonicalize_bootstrap_address(address)
    except Exception:
        return address
    return found if isinstance(found, str) and found else address


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """A TCP connection to HOST:PORT first: Ray itself retries an unreachable head node
    for minutes before it gives up."""
    import socket

    if address == "auto":
        return  # no cluster recorded: Ray says so at once
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise SweepError(f"--ray {address!r}: expected auto, local, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise SweepError(f"cannot reach Ray at {address}: {e}") from None


def _ray_call(fn: Callable, shared: Any, index: int, job: Any) -> tuple[bool, Any]:
    import torch

    torch.set_num_threads(1)  # one CPU per task (Ray schedules by num_cpus=1)
    return _call(fn, shared, index, job)


def _run_ray(fn: Callable, jobs: list, workers: int, address: str, shared: Any, bar):
    ray = _import_ray()
    owned = _connect_ray(ray, address, workers)
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(_ray_call)
        shared_ref = ray.put(shared)  # once, not once per job
        refs = {task.remote(fn, shared_ref, i, job): i for i, job in enumerate(jobs)}
        results: list[Any] = [None] * len(jobs)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                i = refs[ref]
                try:
                    outcome = ray.get(ref)
                except Exception as e:  # the task never returned (worker lost, node died)
                    for other in pending:
                        ray.cancel(other)
                    raise SweepError(f"{_label(i, jobs[i])} failed on Ray: "
                                     f"{type(e).__name__}: {e}") from None  # fmt: skip
                if not outcome[0]:
                    for other in pending:
                        ray.cancel(other)
                results[i] = _unwrap(i, jobs[i], outcome)
                bar.update(1)
        return results
    finally:
        if owned:
            ray.shutdown()
