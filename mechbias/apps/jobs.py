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
import hmac
import json
import os
import pickle
import shutil
import socket
import sys
import tempfile
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _pkg_version
from ..core.models import DATA_FILES, load_model, model_label
from ..core.results import atomic_write_json, set_seed

try:
    _MECHBIAS_VERSION = _pkg_version("mechbias")
except PackageNotFoundError:  # a checkout that was not installed: keys still work, stamped as such
    _MECHBIAS_VERSION = "uninstalled-checkout"


def code_fingerprint() -> str:
    """SHA-256 (16 hex digits) of mechbias's Python sources. Not part of job keys (a job kind's ``version`` is:
    an edit that leaves results unchanged must not throw the store away); stamped on every job, so a study
    says how many of the jobs it reused were computed by other code."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


_CODE_CACHE: list[str] = []


def _code() -> str:
    """:func:`code_fingerprint`, computed on first use (``import mechbias`` hashes no files)."""
    if not _CODE_CACHE:
        _CODE_CACHE.append(code_fingerprint())
    return _CODE_CACHE[0]
JobFn = Callable[["WorkerContext", dict, dict], dict]


@dataclass(frozen=True)
class JobKind:
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
    deps: dict[str, tuple["Job", str]] = field(default_factory=dict)
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

def model_fingerprint(model) -> str:
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
# the store
# ----------------------------------------------------------------------------

@dataclass
class JobOutput:
    parts: dict[str, bytes]
    files: dict[str, bytes]
    meta: dict
    error: str | None = None


class StoreWarning(UserWarning):
    """A job-store entry that failed verification and is recomputed."""


def store_key() -> bytes:
    """The secret that authenticates job-store parts: ``$MECHBIAS_STORE_KEY`` if set (share it with the people
    who share a store), else a random key kept in ``~/.config/mechbias/store-key`` (created, mode 0600, on first
    use). It lives outside every store, so whoever can write to a store cannot forge an entry."""
    env = os.environ.get("MECHBIAS_STORE_KEY")
    if env:
        return env.encode()
    path = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "mechbias" / "store-key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".store-key.")
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(32).hex())
        os.chmod(tmp, 0o600)
        try:
            os.link(tmp, path)  # atomic, and never replaces a key another process wrote first
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return path.read_text().strip().encode()


def _mac(key: bytes, job_key: str, name: str, blob: bytes) -> str:
    return hmac.new(key, job_key.encode() + b"\0" + name.encode() + b"\0" + blob, hashlib.sha256).hexdigest()


class JobStore:
    """Finished jobs on disk: ``ROOT/<kind>/<key>/{parts/*.pkl, files/..., job.json}``.

    Parts are pickles (results, interventions and tensors have no common data form) and are **never
    unpickled unless authenticated**: ``job.json`` records an HMAC-SHA256 of each part under a key kept
    outside the store (:func:`store_key`). An entry whose ``job.json`` does not parse, whose part is missing,
    truncated or altered, or that was written without a MAC (older mechbias, or by hand) is not trusted:
    :meth:`done` warns (:class:`StoreWarning`), moves it aside to ``ROOT/_rejected/`` (nothing is deleted) and
    the job is recomputed. Writes are atomic renames; of two writers of the same job the first rename wins and
    the other's copy is discarded, so a finished entry never disappears or changes."""

    def __init__(self, root: str | Path, *, key: bytes | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._key = key if key is not None else store_key()
        self._verified: set[str] = set()
        self._clean_stale_tmp()

    def _clean_stale_tmp(self, age_s: float = 24 * 3600) -> None:
        """Remove this store's own temporary folders (``<kind>/.tmp-*``) left by a crash over a day ago."""
        now = time.time()
        for tmp in self.root.glob("*/.tmp-*"):
            try:
                if tmp.is_dir() and now - tmp.stat().st_mtime > age_s:
                    shutil.rmtree(tmp, ignore_errors=True)
            except OSError:
                pass

    def path(self, job: Job) -> Path:
        return self.root / job.kind / job.key

    def _problem(self, job: Job) -> str | None:
        """Why the stored entry of ``job`` cannot be trusted (None: it can). Reads and authenticates every part."""
        folder = self.path(job)
        try:
            meta = json.loads((folder / "job.json").read_text())
        except (OSError, ValueError) as e:
            return f"job.json unreadable ({type(e).__name__})"
        macs = meta.get("macs") if isinstance(meta, dict) else None
        if not isinstance(macs, dict) or sorted(macs) != sorted(meta.get("parts", [])):
            return "no authentication code for its parts (written by older mechbias or not by mechbias)"
        for name, mac in macs.items():
            try:
                blob = (folder / "parts" / f"{_safe(name)}.pkl").read_bytes()
            except OSError:
                return f"part {name!r} missing"
            if not hmac.compare_digest(_mac(self._key, job.key, name, blob), str(mac)):
                return f"part {name!r} fails its authentication code (truncated, altered, or another store key)"
        return None

    def done(self, job: Job) -> bool:
        """Whether ``job`` has a finished, authenticated entry. An entry that fails verification is moved to
        ``ROOT/_rejected/`` with a :class:`StoreWarning`, and the job counts as not done (it is recomputed)."""
        if job.key in self._verified:
            return True
        if not (self.path(job) / "job.json").exists():
            return False
        problem = self._problem(job)
        if problem is None:
            self._verified.add(job.key)
            return True
        aside = self.root / "_rejected" / f"{job.kind}-{job.key[:16]}-{uuid.uuid4().hex[:8]}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(self.path(job), aside)
        except OSError:
            pass  # another process moved or replaced it first
        warnings.warn(f"job store: {job.label} at {self.path(job)}: {problem}; moved to {aside} and recomputed",
                      StoreWarning, stacklevel=2)
        return False

    def write(self, job: Job, out: JobOutput) -> Path:
        final = self.path(job)
        if self.done(job):
            return final
        tmp = final.parent / f".tmp-{job.key[:16]}-{uuid.uuid4().hex[:8]}"
        try:
            (tmp / "parts").mkdir(parents=True)
            for name, blob in out.parts.items():
                (tmp / "parts" / f"{_safe(name)}.pkl").write_bytes(blob)
            for rel, blob in out.files.items():
                p = tmp / "files" / rel
                if ".." in Path(rel).parts or Path(rel).is_absolute():
                    raise ValueError(f"{job.label}: a job file may not leave its folder: {rel!r}")
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(blob)
            macs = {name: _mac(self._key, job.key, name, blob) for name, blob in out.parts.items()}
            (tmp / "job.json").write_text(json.dumps({"kind": job.kind, "label": job.label, "params": job.params,
                                                      "deps": {n: [j.key, part] for n, (j, part) in job.deps.items()},
                                                      "parts": sorted(out.parts), "macs": macs, **out.meta},
                                                     indent=1, default=str))
            if final.exists() and not (final / "job.json").exists():
                # an incomplete folder (no job.json) from a crash: move it aside atomically, never delete in place
                stale = final.parent / f".tmp-stale-{uuid.uuid4().hex[:8]}"
                try:
                    os.replace(final, stale)
                    shutil.rmtree(stale, ignore_errors=True)
                except OSError:
                    pass
            try:
                os.replace(tmp, final)
            except OSError:
                # another writer's rename won (a non-empty folder is never replaced): keep the winner's entry
                if not (final / "job.json").exists():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self._verified.add(job.key)
        err = self.root / "_errors" / job.key
        if err.exists():
            err.unlink()
        return final

    def write_error(self, job: Job, message: str) -> None:
        atomic_write_json({"label": job.label, "kind": job.kind, "params": job.params, "error": message},
                          self.root / "_errors" / job.key)

    def load(self, job: Job, part: str = "value") -> Any:
        folder = self.path(job)
        p = folder / "parts" / f"{_safe(part)}.pkl"
        if not p.exists():
            have = self.meta(job).get("parts", []) if (folder / "job.json").exists() else []
            raise KeyError(f"{job.label} has no part {part!r} (parts: {have})")
        blob = p.read_bytes()
        mac = (self.meta(job).get("macs") or {}).get(part)
        if mac is None or not hmac.compare_digest(_mac(self._key, job.key, part, blob), str(mac)):
            raise RuntimeError(f"{job.label}: its stored part {part!r} at {p} fails authentication (altered, "
                               "truncated, or written under another store key); it is not loaded. Run again: "
                               "the entry is moved aside and recomputed")
        try:
            return pickle.loads(blob)
        except (ModuleNotFoundError, AttributeError) as e:  # a class that moved or was renamed since
            code = self.meta(job).get("code", "unknown")
            raise RuntimeError(f"{job.label}: its stored part {part!r} was written by other code (stamp {code}; "
                               f"this code {_code()}) and no longer loads ({e}); delete {self.path(job)} to "
                               "recompute it") from e

    def meta(self, job: Job) -> dict:
        return json.loads((self.path(job) / "job.json").read_text())

    def files(self, job: Job) -> Path:
        return self.path(job) / "files"


def _safe(name: str) -> str:
    return name.replace("/", "__")


# ----------------------------------------------------------------------------
# running one job (in a worker or in the driver)
# ----------------------------------------------------------------------------

@dataclass
class WorkerContext:
    """What a job function sees: the model (loaded once per worker), a scratch folder for files, a logger."""

    model_spec: dict
    threads: int
    _model: Any = None
    out: Path | None = None
    log: Callable[[str], None] = lambda s: None

    @property
    def model(self):
        if self._model is None:
            self._model = load_model(self.model_spec["name"], **self.model_spec.get("kwargs", {}))
        return self._model


def execute(ctx: WorkerContext, kind: str, params: dict, deps: dict, inputs: dict) -> JobOutput:
    """Run one job with fixed threads and seeds; errors are returned, not raised."""
    torch.set_num_threads(ctx.threads)
    set_seed(0)
    t0 = time.time()
    meta = {"threads": ctx.threads, "host": socket.gethostname(), "pid": os.getpid(),
            "node": _node_id(), "code": _code()}
    with tempfile.TemporaryDirectory(prefix="mechbias-job-") as tmp:
        ctx.out = Path(tmp)
        try:
            parts = _KINDS[kind].fn(ctx, params, {**deps, **inputs})
        except Exception:  # noqa: BLE001 - recorded and reported by the driver
            return JobOutput({}, {}, meta, traceback.format_exc())
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


def run_planners(planners: dict[str, Planner], store: JobStore, executor, *, progress: bool = True,
                 log: Callable[[str], None] | None = None) -> RunReport:
    """Advance every planner until it returns; run each job at most once (reusing the store).

    A job that raises is recorded in ``ROOT/_errors/<key>`` and its planner stops
    (the others go on); :class:`RunReport` lists the failures."""
    say = log or (lambda s: None)
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
            except Exception:  # noqa: BLE001 - a planner's own error (e.g. assembling) ends that planner only
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
                    batch, pending = waiting[name]
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


def critical_path(store: JobStore, report: RunReport) -> dict:
    """Total work and critical path (seconds as measured when each job was computed) of the jobs a run
    touched, with each planner's stages as dependencies: the wall time on 1 worker is about the total,
    on unlimited workers about the critical path."""
    metas = {k: store.meta(n["job"]) for k, n in report.graph.items() if store.done(n["job"])}
    secs = {k: float(metas[k].get("seconds", 0.0)) if k in metas else 0.0 for k in report.graph}
    finish: dict[str, float] = {}

    def done_at(k: str, depth: int = 0) -> float:
        if k not in finish:
            preds = [p for p in report.graph[k]["preds"] if p in report.graph and p != k]
            finish[k] = secs[k] + max((done_at(p, depth + 1) for p in preds), default=0.0)
        return finish[k]

    for k in report.graph:
        done_at(k)
    by_kind: dict[str, list[float]] = {}
    for k, n in report.graph.items():
        by_kind.setdefault(n["job"].kind, []).append(secs[k])
    codes: dict[str, int] = {}
    for m in metas.values():
        c = str(m.get("code", "unknown"))
        codes[c] = codes.get(c, 0) + 1
    return {"total_work_seconds": round(sum(secs.values()), 1),
            "code": _code(), "jobs_by_code": codes,
            "jobs_by_other_code": sum(v for k, v in codes.items() if k != _code()),
            "critical_path_seconds": round(max(finish.values(), default=0.0), 1),
            "jobs": len(secs),
            "by_kind": {k: {"jobs": len(v), "seconds": round(float(np.sum(v)), 1), "max": round(float(np.max(v)), 1)}
                        for k, v in sorted(by_kind.items())}}


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)
