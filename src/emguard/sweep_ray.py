"""The Ray executor of a sweep: each run is one Ray task, one GPU each where there are GPUs.

A run's task receives the results of the runs it needs as arguments, so Ray starts it
only after they finish; a run whose source failed is reported blocked. Every node
needs emguard installed and the study folder on a shared filesystem (run folders, the
sweep log and the model cache are written there). ``address``: ``auto`` or
``ray://HOST:10001`` for a running cluster, None for a local instance.

emguard.sweep hands in what runs one run (``execute``) and what gathers the outcomes
(``collect``), so this module does not import it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from emguard.study import PlannedRun


def _task(execute: Callable[..., str], run: PlannedRun, log_path: str, reevaluate: bool,
          *needs: str) -> str:
    return execute(run, log_path, judge_now=False, progress=False, reevaluate=reevaluate)


def _describe(error: BaseException) -> str:
    """The run's own exception, not Ray's wrapper around it."""
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {cause}"


def run_with_ray(runs: list[PlannedRun], log_path: str, address: str | None,
                 notify: Callable[[str, str], None], *, execute: Callable[..., str],
                 collect: Callable[..., Any], num_cpus: int | None = None,
                 reevaluate: bool = False) -> Any:
    """Submit every run (sources first), then collect results in order.

    ``execute``: emguard.sweep.execute_run (run in the Ray task); ``collect``:
    emguard.sweep.collect, whose SweepResult is returned."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("--executor ray needs Ray: pip install 'emguard[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, num_cpus=num_cpus if address is None else None,
                 include_dashboard=False, log_to_driver=False)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        remote = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1, max_retries=0)(_task)
        refs = {}
        for run in runs:
            refs[run.name] = remote.remote(execute, run, log_path, reevaluate,
                                           *[refs[n] for n in run.needs])
        return collect(runs, log_path, notify, lambda run: ray.get(refs[run.name]),
                       errors=(ray.exceptions.RayError,), describe=_describe)
    finally:
        if started_here:
            ray.shutdown()
