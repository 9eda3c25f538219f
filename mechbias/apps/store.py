"""The job store: finished jobs on disk, safe to share.

``ROOT/<kind>/<key>/{parts/*.pkl, files/..., job.json}``, written to a temporary folder and renamed. Parts are
authenticated with an HMAC under a key kept outside every store (:func:`store_key`) and never unpickled
otherwise; a damaged, foreign or altered entry is moved aside and recomputed (:class:`JobStore`). Every job
is stamped with a fingerprint of mechbias's source code (:func:`code_fingerprint`, computed on first use).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import pickle
import shutil
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypedDict

from ..core.results import atomic_write_json


class JobRecord(TypedDict, total=False):
    """A finished job's ``job.json``: what it was, its parts and their MACs, and how it was computed."""

    kind: str
    label: str
    params: dict[str, Any]
    deps: dict[str, list[str]]  # dependency name -> [job key, part]
    parts: list[str]
    macs: dict[str, str]
    seconds: float
    started: float  # when the job started (seconds since the epoch)
    flops: int
    code: str
    node: str | None
    threads: int
    host: str
    pid: int

class _Job(Protocol):
    """What the store reads of a :class:`~mechbias.apps.jobs.Job`."""

    kind: str
    key: str
    label: str
    params: dict
    deps: dict


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


def code_stamp() -> str:
    """:func:`code_fingerprint`, computed on first use (``import mechbias`` hashes no files)."""
    if not _CODE_CACHE:
        _CODE_CACHE.append(code_fingerprint())
    return _CODE_CACHE[0]

@dataclass
class JobOutput:
    """A job's stored output: named parts, files, metadata and the error, if it failed."""
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

    def path(self, job: _Job) -> Path:
        return self.root / job.kind / job.key

    def _problem(self, job: _Job) -> str | None:
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

    def done(self, job: _Job) -> bool:
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
        with contextlib.suppress(OSError):  # another process moved or replaced it first
            os.replace(self.path(job), aside)
        warnings.warn(f"job store: {job.label} at {self.path(job)}: {problem}; moved to {aside} and recomputed",
                      StoreWarning, stacklevel=2)
        return False

    def write(self, job: _Job, out: JobOutput) -> Path:
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

    def write_error(self, job: _Job, message: str) -> None:
        atomic_write_json({"label": job.label, "kind": job.kind, "params": job.params, "error": message},
                          self.root / "_errors" / job.key)

    def load(self, job: _Job, part: str = "value") -> Any:
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
                               f"this code {code_stamp()}) and no longer loads ({e}); delete {self.path(job)} to "
                               "recompute it") from e

    def meta(self, job: _Job) -> JobRecord:
        """The finished job's record (``job.json``)."""
        return json.loads((self.path(job) / "job.json").read_text())

    def files(self, job: _Job) -> Path:
        return self.path(job) / "files"


def _safe(name: str) -> str:
    return name.replace("/", "__")
