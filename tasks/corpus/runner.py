"""Mapping a Prefect task over chunks of work, on the task runner a stage's config names.

Inside a flow run each call is a Prefect task run (logged, visible in the UI, with its own state), submitted to a
task runner built from the config by `task_runner`: Prefect's `ThreadPoolTaskRunner` (`kind: local`, `workers`
threads; the tokenizers release the GIL) or prefect-dask's `DaskTaskRunner` (`kind: dask`): a local cluster of
`workers` processes, or the existing cluster at `address`. The runner is built inside the stage, not on the flow,
because the flow reads its config only once it runs; the stage's own Prefect task stays where it is.

Called as a plain function with no flow run (tests, benchmarks), the same functions run on a thread pool or on the
Dask cluster directly, so a stage never needs a Prefect API just to be callable. Either way the results come back
in the order of the calls, which is what makes the output independent of where and in what order the work ran.
"""
from __future__ import annotations

import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from pipeline_config.shard import RunnerConfig
from tasks.reporting.prefect_artifacts import Progress


def task_runner(cfg: RunnerConfig, workers: int) -> Any:
    """The Prefect task runner `cfg` names (not started: use it as a context manager)."""
    if cfg.kind == "local":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers)
    from prefect_dask import DaskTaskRunner

    if cfg.address:
        return DaskTaskRunner(address=cfg.address)
    return DaskTaskRunner(cluster_kwargs=_local_cluster(workers))


def _local_cluster(workers: int) -> dict[str, Any]:
    return {"n_workers": workers, "processes": True, "threads_per_worker": 1, "dashboard_address": None}


def _in_flow_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


@contextmanager
def _submitter(cfg: RunnerConfig, workers: int) -> Iterator[Callable[[Any, dict[str, Any]], Any]]:
    """submit(task, call) -> a future: a Prefect task run inside a flow run, else the task's function, on threads or
    on Dask, without Prefect."""
    if _in_flow_run():
        with task_runner(cfg, workers) as runner:
            yield lambda task, call: runner.submit(task, call)
    elif cfg.kind == "local":
        with ThreadPoolExecutor(max_workers=workers) as pool:
            yield lambda task, call: pool.submit(task.fn, **call)
    else:
        import distributed

        cluster = cfg.address or distributed.LocalCluster(**_local_cluster(workers))
        with distributed.Client(cluster) as client:
            yield lambda task, call: client.submit(task.fn, **call, pure=False)
        if not cfg.address:
            cluster.close()


@contextmanager
def task_mapper(cfg: RunnerConfig, workers: int, log: logging.Logger) -> Iterator[Callable[..., list[Any]]]:
    """A `map(task, calls, what, size=None)` on one runner (one Dask cluster) for the whole block: `task(**call)`
    for every call, the results in call order; `size(result)` (bytes) feeds the progress line."""
    with _submitter(cfg, workers) as submit:
        yield functools.partial(_map, submit, log)


def _map(submit: Callable[[Any, dict[str, Any]], Any], log: logging.Logger, task: Any, calls: list[dict[str, Any]],
         what: str, size: Callable[[Any], float] | None = None) -> list[Any]:
    started, done_bytes, results = time.perf_counter(), 0.0, []
    futures = [submit(task, call) for call in calls]
    progress = Progress(what, len(calls), what)  # a Prefect progress artifact, e.g. "shard: chunks tokenized"
    for number, future in enumerate(futures, 1):
        results.append(future.result())
        done_bytes += size(results[-1]) if size else 0
        _progress(log, what, number, len(calls), done_bytes, started, max(len(calls) // 20, 1))
        progress.update(number, f"{done_bytes / 1e6:.1f} MB of text" if size else "")
    return results


def _progress(log: logging.Logger, what: str, done: int, total: int, nbytes: float, started: float, step: int) -> None:
    if done % step and done != total:
        return
    elapsed = max(time.perf_counter() - started, 1e-9)
    eta = elapsed / done * (total - done)
    rate = f", {nbytes / 1e6 / elapsed:.1f} MB/s" if nbytes else ""
    log.info("%s: %d/%d%s, %.0f s elapsed, eta %.0f s", what, done, total, rate, elapsed, eta)
