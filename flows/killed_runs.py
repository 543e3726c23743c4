"""Record in Prefect the end of a run that was killed without a word (SIGKILL, out of memory, the machine stopping).

Such a run cannot report its end, so Prefect shows it, and the stage it was in, 'Running' for good. Prefect's own
remedy (heartbeats and an automation that marks silent runs Crashed) needs a worker or `serve` to send them; a run
from the command line has neither. The artifacts lock can tell instead: each run writes its flow run's id into
`<artifacts>/.lock` and empties the file as it lets go of the lock, so the next run to take the lock and find an id
there knows that run died holding it, and records it Crashed, with its stages, if Prefect still has it Running. A run
recorded by another Prefect API (a temporary one since gone, another server) is not there to find, and is left alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def record_killed_run(root: Path) -> None:
    """Write this flow run into the artifacts lock (held), and record Crashed the run that died holding it before."""
    from prefect import get_run_logger
    from prefect.runtime import flow_run

    from tasks.stage import note_holder

    root = Path(root).resolve()
    left = note_holder(root, flow_run=str(flow_run.id), flow_run_name=flow_run.name)
    if not left or not left.get("flow_run") or left["flow_run"] == str(flow_run.id):
        return
    what = (f"ended without saying how (its process, pid {left.get('pid')} on {left.get('host')}, was killed: "
            "SIGKILL, out of memory, or the machine stopped)")
    message = f"{what}; recorded by flow run '{flow_run.name}', the next run on {root}"
    if _record_crashed(left["flow_run"], message):
        get_run_logger().warning("build-model: the previous run on %s, flow run '%s', %s: now recorded Crashed in "
                                 "Prefect", root, left.get("flow_run_name", left["flow_run"]), what)


def _record_crashed(flow_run_id: str, message: str) -> bool:
    """Set the flow run and its unfinished task runs Crashed, if this API still has the flow run running."""
    from prefect import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterState,
                                                TaskRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    unfinished = [StateType.RUNNING, StateType.PENDING]
    with get_client(sync_client=True) as client:
        try:
            run: Any = client.read_flow_run(flow_run_id)
        except ObjectNotFound:
            return False  # recorded by another Prefect API
        if run.state is None or run.state.type not in unfinished:
            return False
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
            task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=unfinished))))
        for task in tasks:
            client.set_task_run_state(task.id, Crashed(message=message), force=True)
        client.set_flow_run_state(run.id, Crashed(message=message), force=True)
    return True
