"""Content-addressed jobs: keys, the store, failures, and a study that gives the same results whatever runs it
(1 worker in-process, 2 Ray workers with one killed in the middle of a job, an interrupted-then-resumed run,
and a real two-node Ray cluster)."""

import json
import os
import pickle
import signal
import threading
import time
from pathlib import Path

import pytest
import ray

from mechbias.apps import jobs as jobs_mod
from mechbias.apps import store as store_mod
from mechbias.apps.executors import InProcess, RayExecutor
from mechbias.apps.jobs import Job, JobStore, job_kind, run_planners
from mechbias.apps.study import StudyConfig, run_study
from mechbias.core.models import load_model
from mechbias.core.results import run_summary_json

calls: list[str] = []


@job_kind("test_add")
def _add(ctx, p, d):
    calls.append(p["name"])
    if p.get("fail"):
        raise RuntimeError(f"planned failure of {p['name']}")
    return {"value": p["x"] + sum(v for k, v in d.items() if k.startswith("in"))}


def _chain(salt, fail=False):
    a = Job("test_add", {"name": "a", "x": 1}, salt=salt)
    b = Job("test_add", {"name": "b", "x": 10, "fail": fail}, deps={"in": (a, "value")}, salt=salt)
    res = yield [a]
    assert res(a) == 1
    res = yield [b]
    return res(b)


def test_keys_depend_on_everything_and_only_on_it():
    a = Job("test_add", {"name": "a", "x": 1}, salt="s")
    assert Job("test_add", {"x": 1, "name": "a"}, salt="s").key == a.key  # parameter order does not matter
    assert Job("test_add", {"name": "a", "x": 2}, salt="s").key != a.key
    assert Job("test_add", {"name": "a", "x": 1.0}, salt="s").key != a.key  # 1 and 1.0 are different settings
    assert Job("test_add", {"name": "a", "x": 1}, salt="t").key != a.key  # another model or data
    b1 = Job("test_add", {"name": "b", "x": 1}, deps={"in": (a, "value")}, salt="s")
    b2 = Job("test_add", {"name": "b", "x": 1}, deps={"in": (Job("test_add", {"name": "a", "x": 5}, salt="s"),
                                                                "value")}, salt="s")
    assert b1.key != b2.key  # a different input job
    with pytest.raises(ValueError, match="unknown job kind"):
        Job("no_such_kind", {})
    with pytest.raises(TypeError, match="JSON-like"):
        Job("test_add", {"x": object()})


def test_store_runs_each_job_once_records_failures_and_resumes(tmp_path):
    store = JobStore(tmp_path)
    ex = InProcess(None, {"name": "none"}, threads=1)
    calls.clear()
    rep = run_planners({"ok": _chain("s1"), "bad": _chain("s1b", fail=True)}, store, ex, progress=False)
    assert rep.values["ok"] == 11 and "bad" not in rep.values
    assert [f["label"] for f in rep.failed["bad"]] == [Job("test_add", {"name": "b", "x": 10, "fail": True},
                                                           deps={"in": (Job("test_add", {"name": "a", "x": 1},
                                                                            salt="s1b"), "value")},
                                                           salt="s1b").label]
    assert "planned failure of b" in rep.failed["bad"][0]["error"]
    assert len(list((tmp_path / "_errors").iterdir())) == 1
    # a half-written job folder (no job.json) is not a result
    (tmp_path / "test_add" / ("0" * 64)).mkdir()
    calls.clear()
    rep2 = run_planners({"ok": _chain("s1"), "bad": _chain("s1b", fail=False)}, store, ex, progress=False)
    assert rep2.ok and rep2.values == {"ok": 11, "bad": 11}
    assert calls == ["b"]  # only the job that failed runs again (with its fixed parameters: a new key)
    assert rep2.computed == 1 and rep2.reused == 3


class _Moved:
    """A class that a later version moves away (simulated by deleting it from this module)."""


def test_a_part_written_by_code_whose_class_moved_gives_a_clear_error(tmp_path):
    store = JobStore(tmp_path)
    ex = InProcess(None, {"name": "none"}, threads=1)
    a = Job("test_add", {"name": "a", "x": 1}, salt="moved")
    run_planners({"a": iter_one(a)}, store, ex, progress=False)
    _rewrite_part(store, a, pickle.dumps(_Moved()))  # as the older code would have written it
    assert isinstance(store.load(a), _Moved)  # the class is still here: it loads
    saved = globals().pop("_Moved")
    try:
        with pytest.raises(RuntimeError, match=r"written by other code .* delete .* to recompute it"):
            store.load(a)
    finally:
        globals()["_Moved"] = saved


def _rewrite_part(store, job, blob, *, mac=True):
    """Replace a stored part's bytes; with ``mac`` also its authentication code (as mechbias would write it)."""
    (store.path(job) / "parts" / "value.pkl").write_bytes(blob)
    if mac:
        meta = store.meta(job)
        meta["macs"]["value"] = store_mod._mac(store._key, job.key, "value", blob)
        (store.path(job) / "job.json").write_text(json.dumps(meta))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ.get("MECHBIAS_EVIL_MARK", "/nonexistent/x"),))


def test_a_crafted_pickle_in_a_shared_store_is_never_unpickled(tmp_path, monkeypatch):
    """Whoever can write to a store must not get code execution (issue 31): a part is unpickled only when its
    HMAC, under a key kept outside the store, matches."""
    mark = tmp_path / "pwned"
    monkeypatch.setenv("MECHBIAS_EVIL_MARK", str(mark))
    store = JobStore(tmp_path / "store")
    ex = InProcess(None, {"name": "none"}, threads=1)
    a = Job("test_add", {"name": "a", "x": 1}, salt="evil")
    run_planners({"a": iter_one(a)}, store, ex, progress=False)
    _rewrite_part(store, a, pickle.dumps(_Evil()), mac=False)
    with pytest.raises(RuntimeError, match="fails authentication"):
        store.load(a)
    # a fresh run (a new store object) sees the entry fail verification, moves it aside and recomputes
    calls.clear()
    with pytest.warns(jobs_mod.StoreWarning, match="authentication code"):
        rep = run_planners({"a": iter_one(a)}, JobStore(tmp_path / "store"), ex, progress=False)
    assert rep.values["a"] == 1 and calls == ["a"]
    assert not mark.exists()
    assert len(list((tmp_path / "store" / "_rejected").iterdir())) == 1  # kept for inspection, not deleted
    # a store written under another key is not trusted either
    with pytest.warns(jobs_mod.StoreWarning):
        assert not JobStore(tmp_path / "store", key=b"someone else").done(a)


@pytest.mark.parametrize("damage", ["truncated part", "truncated job.json", "missing part"])
def test_a_damaged_entry_is_recomputed_with_a_warning(tmp_path, damage):
    store = JobStore(tmp_path)
    ex = InProcess(None, {"name": "none"}, threads=1)
    a = Job("test_add", {"name": "a", "x": 7}, salt="damage")
    run_planners({"a": iter_one(a)}, store, ex, progress=False)
    folder = store.path(a)
    if damage == "truncated part":
        blob = (folder / "parts" / "value.pkl").read_bytes()
        (folder / "parts" / "value.pkl").write_bytes(blob[: len(blob) // 2])
    elif damage == "truncated job.json":
        text = (folder / "job.json").read_text()
        (folder / "job.json").write_text(text[: len(text) // 2])
    else:
        (folder / "parts" / "value.pkl").unlink()
    calls.clear()
    with pytest.warns(jobs_mod.StoreWarning):
        rep = run_planners({"a": iter_one(a)}, JobStore(tmp_path), ex, progress=False)
    assert rep.ok and rep.values["a"] == 7 and calls == ["a"] and rep.computed == 1
    assert JobStore(tmp_path).load(a) == 7


def test_two_writers_and_a_reader_never_see_an_entry_vanish_or_change(tmp_path):
    """Concurrent writers of the same jobs: the first rename wins, the loser's copy is discarded; a reader
    never sees a finished entry disappear, fail to load, or change value (issue 31: 280 vanished reads and
    82 contradictory KeyErrors in 15 trials before)."""
    jobs = [Job("test_add", {"name": f"j{i}", "x": i}, salt="race") for i in range(40)]
    outs = {j.key: jobs_mod.JobOutput({"value": pickle.dumps(j.params["x"])}, {}, {"seconds": 0}) for j in jobs}
    problems: list[str] = []
    stop = threading.Event()

    def writer(root, order):
        store = JobStore(root)
        for j in order:
            store.write(j, outs[j.key])

    def reader(root):
        store = JobStore(root)
        seen: set[str] = set()
        while not stop.is_set() or len(seen) < len(jobs):
            for j in jobs:
                exists = (store.path(j) / "job.json").exists()
                if j.key in seen and not exists:
                    problems.append(f"{j.label} vanished")
                if exists:
                    try:
                        if store.load(j) != j.params["x"]:
                            problems.append(f"{j.label} changed value")
                    except (KeyError, RuntimeError, OSError) as e:
                        problems.append(f"{j.label}: {type(e).__name__}")
                    seen.add(j.key)
            if stop.is_set() and len(seen) == len(jobs):
                break

    for trial in range(5):  # each trial on an empty store
        root = tmp_path / f"trial{trial}"
        stop.clear()
        threads = [threading.Thread(target=writer, args=(root, jobs)),
                   threading.Thread(target=writer, args=(root, jobs[::-1])), threading.Thread(target=reader, args=(root,))]
        for t in threads:
            t.start()
        threads[0].join(); threads[1].join()
        stop.set()
        threads[2].join(timeout=60)
        assert not problems, problems[:5]
        assert all(JobStore(root).done(j) for j in jobs)
        assert not list(root.glob("*/.tmp-*"))  # the losers' temporary folders are cleaned


def iter_one(job):
    res = yield [job]
    return res(job)


def test_critical_path_and_total_work_match_a_hand_computed_graph(tmp_path):
    from mechbias.apps.jobs import JobOutput, RunReport, critical_path

    store = JobStore(tmp_path)
    a = Job("test_add", {"name": "a", "x": 1})
    b = Job("test_add", {"name": "b", "x": 2}, deps={"in": (a, "value")})
    c = Job("test_add", {"name": "c", "x": 3})
    d = Job("test_add", {"name": "d", "x": 4})  # a later stage of the planner that yielded c: waits for c
    secs = {a.key: 2.0, b.key: 5.0, c.key: 4.0, d.key: 1.5}
    flops = {a.key: 3e12, b.key: 1e12, c.key: 0, d.key: 5e11}
    from mechbias.apps.jobs import code_fingerprint

    codes = {a.key: code_fingerprint(), b.key: "0123456789abcdef", c.key: code_fingerprint()}  # d: unstamped
    started = {a.key: 100.0, b.key: 102.0, c.key: 100.5, d.key: 104.5}  # b ends last, at 107
    for j in (a, b, c, d):
        store.write(j, JobOutput({}, {}, {"seconds": secs[j.key], "flops": flops[j.key], "started": started[j.key],
                                          **({"code": codes[j.key]} if j.key in codes else {})}))
    rep = RunReport({}, {}, graph={a.key: {"job": a, "preds": set()}, b.key: {"job": b, "preds": {a.key}},
                                   c.key: {"job": c, "preds": set()}, d.key: {"job": d, "preds": {c.key}}})
    cp = critical_path(store, rep)
    assert cp["total_work_seconds"] == 12.5
    assert cp["critical_path_seconds"] == 7.0  # a -> b (2 + 5) is longer than c -> d (4 + 1.5)
    assert cp["by_kind"]["test_add"] == {"jobs": 4, "seconds": 12.5, "max": 5.0, "tflop": 4.5}
    assert cp["total_tflop"] == 4.5 and cp["jobs_without_flop_count"] == 0
    assert cp["jobs_span_seconds"] == 7.0  # the first start (a, 100) to the last finish (b, 107)
    # two runs read as one: counts add, graphs and values join
    both = RunReport({"x": 1}, {}, computed=1, reused=0, job_seconds={"k": 2.0}, graph={a.key: rep.graph[a.key]}) \
        .merged(RunReport({"y": 2}, {}, computed=2, reused=3, job_seconds={"k": 1.0, "m": 4.0},
                          graph={b.key: rep.graph[b.key]}))
    assert (both.values, both.computed, both.reused) == ({"x": 1, "y": 2}, 3, 3)
    assert both.job_seconds == {"k": 3.0, "m": 4.0} and set(both.graph) == {a.key, b.key}
    # jobs computed by other code (or before jobs were stamped) are counted, never silently mixed in
    assert cp["jobs_by_code"] == {code_fingerprint(): 2, "0123456789abcdef": 1, "unknown": 1}
    assert cp["jobs_by_other_code"] == 2 and cp["code"] == code_fingerprint()


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in ("created", "seconds", "wall_seconds")}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _results(out: Path) -> dict[str, str]:
    """Every JSON result of a study (not the work log), as canonical text without creation times."""
    found = {}
    for p in sorted((out / "steps").rglob("*.json")):
        found[str(p.relative_to(out))] = json.dumps(_strip(json.loads(p.read_text())), sort_keys=True)
    found["report"] = "\n".join(l for l in (out / "report.md").read_text().split("## Work")[0].splitlines())
    return found


CFG = dict(quick=True, contexts=("finance", "commerce"), axis="race", n_boot=50, methods=("patch", "prune"),
           threads=1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny quick study on one worker, in-process."""
    out = tmp_path_factory.mktemp("ref")
    model = load_model("tiny")
    assert run_study(model, StudyConfig(**CFG, workers=1), out, progress=False).ok
    return model, out, _results(out)


def test_a_study_with_a_failed_job_says_so_in_its_result(tmp_path, monkeypatch):
    """A job that raises does not stop the others: run_study's StudyResult is not ok, names the failed step,
    and the command line exits 1; the failures are in failed.json."""
    from mechbias.methods.steering import Steering

    def broken(self, model, context, axis):
        raise RuntimeError("a broken selection")

    monkeypatch.setattr(Steering, "select", broken)
    model = load_model("tiny")
    cfg = StudyConfig(**{**CFG, "methods": ("steer",)}, workers=1)
    res = run_study(model, cfg, tmp_path, progress=False)
    assert not res.ok and res.exit_code == 1 and res.out == tmp_path
    assert list(res.failed) == ["steering"] and all("select" in label for label in res.failed["steering"])
    assert set(json.loads((tmp_path / "failed.json").read_text())) == {"steering"}


def test_interrupted_study_resumes_with_identical_results(reference, tmp_path):
    model, _, ref = reference

    class Interrupting(InProcess):
        n = 0

        def submit(self, job, deps):
            Interrupting.n += 1
            if Interrupting.n == 6:
                raise KeyboardInterrupt
            super().submit(job, deps)

    cfg = StudyConfig(**CFG, workers=1)
    with pytest.raises(KeyboardInterrupt):
        run_study(model, cfg, tmp_path, executor=Interrupting(model, {"name": "tiny"}, threads=1), progress=False)
    done_before = sum(1 for _ in (tmp_path / "jobs").rglob("job.json"))
    assert done_before == 5  # the five jobs that finished before the interruption were kept
    assert run_study(model, StudyConfig(**CFG, workers=1), tmp_path, progress=False).ok
    work = json.loads((tmp_path / "work.json").read_text())
    assert work["reused"] == done_before  # nothing finished was computed again
    assert _results(tmp_path) == ref
    # a rerun with nothing changed computes nothing and writes the same results
    assert run_study(model, StudyConfig(**CFG, workers=1), tmp_path, progress=False).ok
    assert json.loads((tmp_path / "work.json").read_text())["computed_now"] == 0
    assert _results(tmp_path) == ref


def test_two_ray_workers_survive_a_killed_worker_with_identical_results(reference, tmp_path):
    model, _, ref = reference
    marker = tmp_path / "markers"
    marker.mkdir()
    killed: list[int] = []

    def killer():  # kill the first worker that holds a scoring job, in the middle of it
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            for f in marker.iterdir():
                pid = int(f.name)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.05)

    ex = RayExecutor({"name": "tiny"}, 2, threads=1, pause={"kind": "scores", "seconds": 2.0,
                                                            "marker_dir": str(marker)})
    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        pids = ex.pids()
        assert run_study(model, StudyConfig(**CFG, workers=2), tmp_path / "out", executor=ex, progress=False).ok
        assert killed and killed[0] in pids  # one of the study's workers died in a job ...
        assert set(ex.pids()) != set(pids)  # ... and Ray restarted it
    finally:
        ex.close()
    assert _results(tmp_path / "out") == ref


def test_study_runs_across_a_two_node_ray_cluster(reference, tmp_path):
    from ray.cluster_utils import Cluster

    _, _, ref = reference
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 200 * 1024**2})
    cluster.add_node(num_cpus=1, object_store_memory=200 * 1024**2)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        model = load_model("tiny")
        cfg = StudyConfig(**CFG, workers=2, address=cluster.address)
        assert run_study(model, cfg, tmp_path, progress=False).ok
        nodes = {json.loads(p.read_text())["node"] for p in (tmp_path / "jobs").rglob("job.json")}
        assert len(nodes) == 2  # jobs ran on both nodes
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert _results(tmp_path) == ref


def test_findings_summarise_the_study_matrices_they_read(reference):
    """analyses/study_findings.py: its within/cross means are the cells' own means, its test is the
    study's transfer test, and its adjusted p-values are Benjamini-Hochberg's over the methods."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("study_findings",
                                                  Path(__file__).parents[1] / "analyses" / "study_findings.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _, out, _ = reference
    text, methods = mod.findings(out)
    assert {m["step"] for m in methods} == {p.parent.name for p in (out / "steps").glob("*/transfer")}
    ps = []
    for m in methods:
        saved = run_summary_json(out / "steps" / m["step"])
        cells = saved["cells"]
        rows = {c["selected_on"] for c in cells}
        diag = [c["gap_removed"] for c in cells if c["selected_on"] == c["evaluated_on"]]
        off = [c["gap_removed"] for c in cells if c["selected_on"] != c["evaluated_on"] and c["evaluated_on"] in rows]
        assert m["within"]["estimate"] == pytest.approx(sum(diag) / len(diag), abs=1e-9)
        assert m["cross"]["estimate"] == pytest.approx(sum(off) / len(off), abs=1e-9)  # square here: equal weights
        assert m["within"]["ci_low"] <= m["within"]["estimate"] <= m["within"]["ci_high"]
        t = saved["transfer_test"]
        assert m["test"]["within_minus_cross"] == pytest.approx(t["within_minus_cross"], abs=1e-12)
        assert m["within"]["estimate"] - m["cross"]["estimate"] == pytest.approx(t["within_minus_cross"], abs=1e-9)
        for name, c in m["controls"].items():
            ctl = [x["controls"][name]["gap_removed"] for x in cells if x["selected_on"] == x["evaluated_on"]]
            assert c["selection_minus_control"]["estimate"] == pytest.approx(
                sum(diag) / len(diag) - sum(ctl) / len(ctl), abs=1e-9)
        ps.append(t["p_value"])
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    for rank, i in enumerate(order, start=1):  # BH by hand: min over j >= rank of p_(j) n / j
        expected = min(1.0, min(ps[order[j - 1]] * len(ps) / j for j in range(rank, len(ps) + 1)))
        assert methods[i]["test_p_adjusted"] == pytest.approx(expected)
    assert "## The transfer question" in text
