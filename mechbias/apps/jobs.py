"""Content-addressed jobs, a store that never computes a job twice, and the executors that run them.

A :class:`Job` is one piece of model work (a selection on a context, the scores
of one intervention on one evaluation set, a perplexity, ...). Its **key** is a
SHA-256 of everything its result depends on: the job kind and that kind's code
version, the mechbias version, a *salt* that names the model (a fingerprint of
its weights) and the data files, its JSON parameters, and the keys of the jobs
it reads. :class:`JobStore` keeps each finished job under ``ROOT/<kind>/<key>/``
(written to a temporary folder and renamed: a job is either complete or
absent), so a run that is interrupted resumes at job granularity and a second
study that shares jobs with the first reuses them.

A job's result is a dict of named *parts* (each pickled on its own, so a job
that needs one part of another reads only that part) and the files the job
wrote in its scratch folder (figures). Workers return results to the driver,
which alone writes the store: a cluster needs no shared file system.

Work is described by *planners*: generators that yield a list of jobs, receive
their results (:class:`Results`) and yield the next list, and finally return a
value. :func:`run_planners` advances many planners at once, so every job whose
inputs are ready runs in parallel, whichever planner it belongs to. Executors:

* :class:`InProcess`: the driver's own model, one job at a time (``--workers 1``,
  for debugging: plain tracebacks, no Ray);
* :class:`RayExecutor`: one Ray actor per worker, each loading the model once;
  a local Ray runtime by default, an existing cluster with ``address``. Actors
  are restarted and their job retried when a worker process dies.

Each job runs with a fixed number of torch threads and fixed global seeds, so a
result does not depend on which worker ran it, in what order, or whether the
run was interrupted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _pkg_version
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.models import DATA_FILES, load_model, model_label
from ..core.results import set_seed
from ..core.work import counting_flops
from .store import JobOutput, JobStore, StoreWarning, code_fingerprint, code_stamp, store_key

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

_LOG = logging.getLogger(__name__)

__all__ = [
    "Job",
    "JobKind",
    "JobOutput",
    "JobStore",
    "Results",
    "RunReport",
    "StoreWarning",
    "WorkerContext",
    "code_fingerprint",
    "code_stamp",
    "critical_path",
    "data_fingerprint",
    "execute",
    "job_kind",
    "job_kinds",
    "model_fingerprint",
    "run_planners",
    "store_key",
]

try:
    _MECHBIAS_VERSION = _pkg_version("mechbias")
except PackageNotFoundError:  # a checkout that was not installed: keys still work, stamped as such
    _MECHBIAS_VERSION = "uninstalled-checkout"


JobFn = Callable[["WorkerContext", dict, dict], dict]


@dataclass(frozen=True)
class JobKind:
    """A registered job function, its name and its result version."""
    name: str
    fn: JobFn
    version: int


_KINDS: dict[str, JobKind] = {}


def job_kind(name: str, version: int = 1) -> Callable[[JobFn], JobFn]:
    """Register a job function ``fn(ctx, params, deps) -> {part: value}`` under ``name``.

    Bump ``version`` whenever a change to the function changes its results: the
    version is part of every key, so old results are not reused."""
    def deco(fn: JobFn) -> JobFn:
        if name in _KINDS and _KINDS[name].fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"job kind {name!r} is registered twice")
        _KINDS[name] = JobKind(name, fn, version)
        return fn
    return deco


def job_kinds() -> dict[str, JobKind]:
    """The registered job kinds, by name."""
    return dict(_KINDS)


def _canonical(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _canonical(v) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))}
    if isinstance(x, (list, tuple)):
        return [_canonical(v) for v in x]
    if isinstance(x, float):
        return repr(x)  # exact
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    raise TypeError(f"job parameters must be JSON-like; got {type(x).__name__}: {x!r}")


@dataclass(eq=False)
class Job:
    """One piece of work. ``deps``: name -> (job, part) read by the job; ``inputs``: values passed as they are,
    which must be determined by ``deps`` (they are not part of the key)."""

    kind: str
    params: dict
    deps: dict[str, tuple[Job, str]] = field(default_factory=dict)
    label: str = ""
    inputs: dict = field(default_factory=dict)
    salt: str = ""
    key: str = field(init=False, default="")

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"unknown job kind {self.kind!r}; registered: {sorted(_KINDS)}")
        spec = {"kind": self.kind, "version": _KINDS[self.kind].version, "mechbias": _MECHBIAS_VERSION, "salt": self.salt,
                "params": _canonical(self.params),
                "deps": {n: [j.key, part] for n, (j, part) in sorted(self.deps.items())}}
        self.key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        self.label = self.label or f"{self.kind}:{self.key[:8]}"

    def __repr__(self) -> str:
        return f"Job({self.label}, {self.key[:12]})"


# ----------------------------------------------------------------------------
# fingerprints
# ----------------------------------------------------------------------------

def model_fingerprint(model: TransformerBridge) -> str:
    """SHA-256 of the model's weights (names, dtypes, shapes, bytes) and its label."""
    h = hashlib.sha256(model_label(model).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_fingerprint(extra: Iterable[str | Path] = ()) -> str:
    """SHA-256 of the packaged data files (contexts, names, texts) and of any extra files."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(DATA_FILES).rglob("*") if p.is_file() and "planted" not in p.parts)
    for p in [*files, *(Path(e) for e in extra)]:
        h.update(str(p.relative_to(DATA_FILES) if p.is_relative_to(DATA_FILES) else p.name).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------
# running one job (in a worker or in the driver)
# ----------------------------------------------------------------------------

@dataclass
class WorkerContext:
    """What a job function sees: the model (loaded once per worker) and a scratch folder for files."""

    model_spec: dict
    threads: int
    _model: Any = None
    out: Path | None = None

    @property
    def folder(self) -> Path:
        """The job's scratch folder (set while the job runs; its files are stored with the job's value)."""
        if self.out is None:
            raise RuntimeError("this job has no scratch folder (WorkerContext.out is set only while a job runs)")
        return self.out

    @property
    def model(self):
        if self._model is None:
            self._model = load_model(self.model_spec["name"], **self.model_spec.get("kwargs", {}))
        return self._model


def execute(ctx: WorkerContext, kind: str, params: dict, deps: dict, inputs: dict, *,
            reraise: bool = False) -> JobOutput:
    """Run one job with fixed threads and seeds; errors are returned, not raised (``reraise``: raised, for an
    in-process run whose caller reports them itself)."""
    torch.set_num_threads(ctx.threads)
    set_seed(0)
    t0 = time.time()
    meta = {"threads": ctx.threads, "started": round(t0, 3), "host": socket.gethostname(), "pid": os.getpid(),
            "node": _node_id(), "code": code_stamp()}
    with tempfile.TemporaryDirectory(prefix="mechbias-job-") as tmp:
        ctx.out = Path(tmp)
        try:
            with counting_flops() as work:
                parts = _KINDS[kind].fn(ctx, params, {**deps, **inputs})
        except Exception:
            if reraise:
                raise
            return JobOutput({}, {}, meta, traceback.format_exc())
        meta["flops"] = work["flops"]
        files = {str(p.relative_to(tmp)): p.read_bytes() for p in Path(tmp).rglob("*") if p.is_file()}
    meta["seconds"] = round(time.time() - t0, 3)
    return JobOutput({k: pickle.dumps(v, protocol=5) for k, v in parts.items()}, files, meta)


def _node_id() -> str | None:
    ray = sys.modules.get("ray")  # a job on a Ray worker has Ray imported; elsewhere there is no node id
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None


# ----------------------------------------------------------------------------
# planners and the driver loop
# ----------------------------------------------------------------------------

class Results:
    """What a planner receives for the jobs it yielded: parts loaded from the store on demand."""

    def __init__(self, store: JobStore):
        self.store = store

    def __call__(self, job: Job, part: str = "value") -> Any:
        return self.store.load(job, part)

    def files(self, job: Job) -> Path:
        return self.store.files(job)


Planner = Generator[list[Job], Results, Any]


@dataclass
class RunReport:
    """What a driver run did: each planner's value or failed jobs, and counts and seconds of the jobs."""
    values: dict[str, Any]  # planner name -> returned value (absent when it failed)
    failed: dict[str, list[dict]]  # planner name -> failed jobs (label, key, error)
    computed: int = 0
    reused: int = 0
    seconds: float = 0.0
    job_seconds: dict[str, float] = field(default_factory=dict)  # kind -> total seconds computed now
    graph: dict[str, dict] = field(default_factory=dict)  # key -> {"job": Job, "preds": keys it waited for}

    @property
    def ok(self) -> bool:
        return not self.failed

    def merged(self, later: RunReport) -> RunReport:
        """This run followed by ``later`` as one run (values, failures, counts, seconds and the job graph)."""
        kinds = {*self.job_seconds, *later.job_seconds}
        return RunReport({**self.values, **later.values}, {**self.failed, **later.failed},
                         self.computed + later.computed, self.reused + later.reused, self.seconds + later.seconds,
                         {k: self.job_seconds.get(k, 0.0) + later.job_seconds.get(k, 0.0) for k in kinds},
                         {**self.graph, **later.graph})


def run_planners(planners: dict[str, Planner], store: JobStore, executor, *, progress: bool = True) -> RunReport:
    """Advance every planner until it returns; run each job at most once (reusing the store).

    A job that raises is recorded in ``ROOT/_errors/<key>`` and its planner stops
    (the others go on); :class:`RunReport` lists the failures."""
    say = _LOG.info
    t0 = time.time()
    results = Results(store)
    report = RunReport({}, {})
    waiting: dict[str, tuple[list[Job], set[str]]] = {}  # planner -> (its batch, keys not yet finished)
    owners: dict[str, list[str]] = {}  # job key -> planners waiting for it
    queued: list[Job] = []
    in_flight: set[str] = set()
    by_key: dict[str, Job] = {}
    bar = tqdm(total=0, desc="jobs", unit="job", disable=not progress, dynamic_ncols=True, smoothing=0.05)
    prev_batch: dict[str, set[str]] = {}  # planner -> keys of its previous batch (what a new batch waited for)

    def advance(name: str, gen: Planner, send: Any) -> None:
        while True:
            try:
                batch = gen.send(send) if send is not None else next(gen)
            except StopIteration as stop:
                report.values[name] = stop.value
                return
            except Exception:
                report.failed.setdefault(name, []).append({"label": f"{name} (planner)", "key": "",
                                                           "error": traceback.format_exc()})
                return
            pending = set()
            for job in batch:
                node = report.graph.setdefault(job.key, {"job": job, "preds": set()})
                node["preds"] |= {d.key for d, _ in job.deps.values()} | prev_batch.get(name, set())
            prev_batch[name] = {j.key for j in batch}
            for job in batch:
                if store.done(job):
                    if job.key not in by_key:
                        by_key[job.key] = job
                        report.reused += 1
                        bar.total += 1
                        bar.update(1)
                    continue
                pending.add(job.key)
                owners.setdefault(job.key, []).append(name)
                if job.key not in by_key:
                    by_key[job.key] = job
                    queued.append(job)
                    bar.total += 1
                    bar.refresh()
            if pending:
                waiting[name] = (batch, pending)
                return
            send = results

    gens = dict(planners)
    for name, gen in gens.items():
        advance(name, gen, None)
    try:
        while queued or in_flight:
            # submit every job whose dependencies are finished, while workers are free
            progressed = True
            while executor.capacity and progressed:
                progressed = False
                for job in list(queued):
                    if not executor.capacity:
                        break
                    deps = [j for j, _ in job.deps.values()]
                    if any(d.key in report_failed_keys(report) for d in deps):
                        queued.remove(job)
                        _fail(job, "a job it depends on failed", store, report, owners, waiting, bar)
                        progressed = True
                        continue
                    if all(store.done(d) for d in deps):
                        queued.remove(job)
                        in_flight.add(job.key)
                        executor.submit(job, {n: store.load(j, part) for n, (j, part) in job.deps.items()})
                        progressed = True
            if not in_flight:
                if queued:  # nothing can run: dependencies that no planner yielded
                    for job in list(queued):
                        queued.remove(job)
                        _fail(job, "its dependencies were never scheduled", store, report, owners, waiting, bar)
                break
            for job, out in executor.wait():
                in_flight.discard(job.key)
                if out.error:
                    say(f"job failed: {job.label}: {out.error.strip().splitlines()[-1]}")
                    store.write_error(job, out.error)
                    _fail(job, out.error, store, report, owners, waiting, bar)
                    continue
                store.write(job, out)
                report.computed += 1
                report.job_seconds[job.kind] = report.job_seconds.get(job.kind, 0.0) + out.meta.get("seconds", 0)
                bar.update(1)
                for name in owners.pop(job.key, []):
                    if name not in waiting:
                        continue
                    _batch, pending = waiting[name]
                    pending.discard(job.key)
                    if not pending:
                        del waiting[name]
                        advance(name, gens[name], results)
    finally:
        bar.close()
    for name in gens:
        if name not in report.values and name not in report.failed:
            report.failed[name] = [{"label": name, "key": "", "error": "did not finish"}]
    report.seconds = time.time() - t0
    return report


def report_failed_keys(report: RunReport) -> set[str]:
    return {f["key"] for fs in report.failed.values() for f in fs if f["key"]}


def _fail(job: Job, error: str, store, report: RunReport, owners, waiting, bar) -> None:
    for name in owners.pop(job.key, [job.label]):
        report.failed.setdefault(name, []).append({"label": job.label, "key": job.key, "error": error})
        waiting.pop(name, None)
    bar.update(1)


class KindWork(TypedDict):
    """One job kind's share of a run's work."""

    jobs: int
    seconds: float
    max: float
    tflop: float


class WorkSummary(TypedDict):
    """Total work and critical path of a run's jobs (:func:`critical_path`)."""

    total_work_seconds: float
    jobs_span_seconds: float  # from the first computed job's start to the last one's finish
    total_tflop: float
    jobs_without_flop_count: int
    code: str
    jobs_by_code: dict[str, int]
    jobs_by_other_code: int
    critical_path_seconds: float
    jobs: int
    by_kind: dict[str, KindWork]


def critical_path(store: JobStore, report: RunReport) -> WorkSummary:
    """Total work and critical path (seconds as measured when each job was computed) of the jobs a run
    touched, with each planner's stages as dependencies: the wall time on 1 worker is about the total,
    on unlimited workers about the critical path."""
    metas = {k: store.meta(n["job"]) for k, n in report.graph.items() if store.done(n["job"])}
    secs = {k: float(metas[k].get("seconds", 0.0)) if k in metas else 0.0 for k in report.graph}
    flops = {k: int(metas[k].get("flops", 0)) if k in metas else 0 for k in report.graph}
    finish: dict[str, float] = {}

    def done_at(k: str, depth: int = 0) -> float:
        if k not in finish:
            preds = [p for p in report.graph[k]["preds"] if p in report.graph and p != k]
            finish[k] = secs[k] + max((done_at(p, depth + 1) for p in preds), default=0.0)
        return finish[k]

    for k in report.graph:
        done_at(k)
    by_kind: dict[str, list[float]] = {}
    flops_by_kind: dict[str, int] = {}
    for k, n in report.graph.items():
        by_kind.setdefault(n["job"].kind, []).append(secs[k])
        flops_by_kind[n["job"].kind] = flops_by_kind.get(n["job"].kind, 0) + flops[k]
    codes: dict[str, int] = {}
    for m in metas.values():
        c = str(m.get("code", "unknown"))
        codes[c] = codes.get(c, 0) + 1
    # how busy the workers were: the jobs computed in this run, between the first start and the last finish
    spans = [(float(m["started"]), float(m["started"]) + float(m.get("seconds", 0.0))) for m in metas.values()
             if "started" in m]
    span = (max(e for _, e in spans) - min(b for b, _ in spans)) if spans else 0.0
    return {"total_work_seconds": round(sum(secs.values()), 1),
            "jobs_span_seconds": round(span, 1),
            "total_tflop": round(sum(flops.values()) / 1e12, 3),
            "jobs_without_flop_count": sum(1 for k in report.graph if k in metas and "flops" not in metas[k]),
            "code": code_stamp(), "jobs_by_code": codes,
            "jobs_by_other_code": sum(v for k, v in codes.items() if k != code_stamp()),
            "critical_path_seconds": round(max(finish.values(), default=0.0), 1),
            "jobs": len(secs),
            "by_kind": {k: {"jobs": len(v), "seconds": round(float(np.sum(v)), 1), "max": round(float(np.max(v)), 1),
                            "tflop": round(flops_by_kind[k] / 1e12, 3)}
                        for k, v in sorted(by_kind.items())}}


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)
