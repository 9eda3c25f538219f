"""Executors of content-addressed jobs (see :mod:`mechbias.apps.jobs`).

* :class:`InProcess`: the driver's own model, one job at a time (``--workers 1``,
  for debugging: plain tracebacks, no Ray);
* :class:`RayExecutor`: one Ray actor per worker, each loading the model once;
  a local Ray runtime by default, an existing cluster with ``address``. Actors
  are restarted and their job retried when a worker process dies.

An executor has ``workers``, ``capacity`` (free workers), ``submit(job, deps)``,
``wait() -> [(job, JobOutput)]`` (at least one finished job while any runs) and
``close()``.
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .jobs import Job, JobOutput, WorkerContext, execute

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge


class InProcess:
    """Runs jobs one at a time in the driver, on the driver's model (no Ray)."""

    workers = 1

    def __init__(self, model: TransformerBridge, model_spec: dict, threads: int | None = None, reraise: bool = False):
        self.ctx = WorkerContext(model_spec, threads or torch.get_num_threads(), model)
        self._done: list[tuple[Job, JobOutput]] = []
        self.reraise = reraise  # a job's exception propagates to the caller (a method command: one-line errors)

    def submit(self, job: Job, deps: dict) -> None:
        self._done.append((job, execute(self.ctx, job.kind, job.params, deps, job.inputs, reraise=self.reraise)))

    def wait(self) -> list[tuple[Job, JobOutput]]:
        out, self._done = self._done, []
        return out

    @property
    def capacity(self) -> int:
        return 0 if self._done else 1

    def close(self) -> None:
        pass


class _Worker:
    """The Ray actor (made a remote class on first use: ``import mechbias`` does not import Ray)."""

    def __init__(self, model_spec: dict, threads: int, pause: dict | None = None):
        self.ctx = WorkerContext(model_spec, threads)
        self.pause = pause or {}

    def pid(self) -> int:
        return os.getpid()

    def run(self, kind: str, params: dict, deps: dict, inputs: dict) -> JobOutput:
        if self.pause.get("kind") == kind:  # a test aid: hold the job so that a test can kill this process in it
            Path(self.pause["marker_dir"], f"{os.getpid()}").write_text(kind)
            time.sleep(self.pause["seconds"])
        return execute(self.ctx, kind, params, deps, inputs)


class RayExecutor:
    """One Ray actor per worker; the model is loaded once per actor.

    ``address``: an existing cluster (``"auto"`` or ``ray://...``); ``None`` starts
    a local runtime with ``workers`` CPUs. Workers ask for one GPU each
    (``gpus_per_worker``) when the model runs on CUDA. Killed workers are
    restarted by Ray and their job retried."""

    def __init__(self, model_spec: dict, workers: int, *, threads: int = 1, address: str | None = None,
                 gpus_per_worker: float = 0.0, pause: dict | None = None):
        import ray  # imported here: Ray is needed only when a study runs on workers

        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                         object_store_memory=min(2 * 1024**3, 256 * 1024**2 * max(workers, 2)))
            self.started = True
        opts: dict = {"num_cpus": 1, "num_gpus": gpus_per_worker, "scheduling_strategy": "SPREAD"}
        worker = ray.remote(max_restarts=-1, max_task_retries=-1)(_Worker)
        self.actors: list[Any] = [worker.options(**opts).remote(model_spec, threads, pause) for _ in range(workers)]
        self.free = list(self.actors)
        self.running: dict[Any, tuple[Job, Any]] = {}
        self.workers = workers

    def pids(self) -> list[int]:
        return self.ray.get([a.pid.remote() for a in self.actors])

    def submit(self, job: Job, deps: dict) -> None:
        actor = self.free.pop()
        ref = actor.run.remote(job.kind, job.params, deps, job.inputs)
        self.running[ref] = (job, actor)

    @property
    def capacity(self) -> int:
        return len(self.free)

    def wait(self) -> list[tuple[Job, JobOutput]]:
        if not self.running:
            return []
        ready, _ = self.ray.wait(list(self.running), num_returns=1)
        out = []
        for ref in ready:
            job, actor = self.running.pop(ref)
            self.free.append(actor)
            try:
                out.append((job, self.ray.get(ref)))
            except Exception:
                out.append((job, JobOutput({}, {}, {}, traceback.format_exc())))
        return out

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        if self.started:
            self.ray.shutdown()


