"""The study's settings (the ``mechbias study`` flags), checked when they are made: every name, file and count
is validated before any model loads."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core.precision import PRECISIONS, check_precision
from ..data.axes import load_axis
from ..data.contexts import load_contexts
from ..methods.base import registered_methods
from .jobs import default_workers

DEFAULT_CONTEXTS = ("finance", "commerce")


@dataclass
class StudyConfig:
    """The study's settings (the ``mechbias study`` flags); the defaults are the default study."""
    contexts: tuple[str, ...] | None = field(default=None, metadata={
        "help": "contexts ('all' = the built-ins; none: finance and commerce, or all with --full)"})
    axes: tuple[str, ...] = field(default=("race", "gender"), metadata={"help": "axes of the baseline"})
    axis: str = field(default="auto", metadata={
        "help": "axis of the method steps and transfer matrices; auto: chosen on the selection split (the axis "
                "with the most contexts whose selection-split gap is significant, then the larger mean |t|)"})
    seed: int = field(default=0, metadata={"help": "seed of splits, bootstrap and sampling"})
    precision: str = field(default="auto", metadata={
        "help": "compute precision of the methods' selections: auto (each method's measured default: fast where "
                "bfloat16 selects the same units at least 1.5x faster), fast (bfloat16 autocast) or exact "
                "(float32). Every reported number (baselines, cells, controls, perplexity) is computed exact",
        "choices": ("auto", *PRECISIONS)})
    n_boot: int = field(default=2000, metadata={"flag": "--boot", "help": "bootstrap replicates"})
    n_random: int | None = field(default=None, metadata={
        "flag": "--random", "help": "draws per control and cell (none: 2; 50 with --full; 1 with --quick)"})
    crossfit: int | None = field(default=None, metadata={
        "help": "cross-fit every method's transfer matrix over this many random splits of templates and names, "
                "each in both folds (selection and held-out halves swapped); 0: none (none: 5 with --full, else 0)"})
    full: bool = field(default=False, metadata={
        "help": "every context, method variant and control (the complete study); default: finance vs. commerce, "
                "one variant per method"})
    quick: bool = field(default=False, metadata={"help": "a small configuration (tests and smoke runs)"})
    methods: tuple[str, ...] | None = field(default=None, metadata={"help": "run only these methods (none: all "
                                                                            "registered)"})
    skip: tuple[str, ...] = field(default=(), metadata={"help": "step names to skip"})
    workers: int | None = field(default=None, metadata={
        "help": "parallel workers (none: one per core); 1 runs in-process without Ray"})
    address: str | None = field(default=None, metadata={
        "help": "an existing Ray cluster to run on ('auto' or host:port; default: $RAY_ADDRESS, else a local "
                "runtime)"})
    threads: int | None = field(default=None, metadata={
        "flag": "--job-threads", "help": "torch threads per job (none: cores / workers); results are bit-identical for equal threads"})
    store: str | None = field(default=None, metadata={
        "help": "job store folder (none: OUT/jobs); studies sharing a store reuse each other's jobs"})

    def __post_init__(self):
        if self.precision != "auto":
            check_precision(self.precision)
        if self.contexts is None:
            self.contexts = ("all",) if self.full else DEFAULT_CONTEXTS
        # built-in contexts by name; a user's YAML file by its absolute path (workers load it from there, and
        # its bytes enter every job's key through study_salt)
        given = [c.name for c in load_contexts("all")] if list(self.contexts) == ["all"] else list(self.contexts)
        refs = []
        for g in given:
            ctx = load_contexts([g])[0]  # validates the name or the file
            user_file = Path(str(g)).suffix in (".yaml", ".yml") or Path(str(g)).exists()
            refs.append(str(Path(g).resolve()) if user_file else ctx.name)
        names = [load_contexts([r])[0].name for r in refs]
        if len(set(names)) != len(names):
            raise ValueError(f"the study names a context twice: {names}")
        self.contexts = tuple(refs)
        for a in (*self.axes, *([] if self.axis == "auto" else [self.axis])):
            load_axis(a)
        known = registered_methods()
        bad = [m for m in (self.methods or ()) if m not in known]
        if bad:
            raise ValueError(f"unknown methods {bad}; registered: {sorted(known)}")
        if self.quick and self.n_boot == 2000:
            self.n_boot = 300
        if self.n_random is None:
            self.n_random = 1 if self.quick else 50 if self.full else 2
        if self.crossfit is None:
            self.crossfit = 5 if self.full else 0
        if self.crossfit < 0:
            raise ValueError(f"--crossfit must be >= 0, not {self.crossfit}")
        if self.n_random < 0:
            raise ValueError(f"--random must be >= 0, not {self.n_random}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, not {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, not {self.threads}")
        if self.address is None:
            self.address = os.environ.get("RAY_ADDRESS") or None
        steps = {"baseline"} | {n for cls in known.values() for n in cls.study_configs(self.quick, full=True)}
        bad = [n for n in self.skip if n not in steps]
        if bad:
            raise ValueError(f"--skip: unknown steps {bad}; steps: {sorted(steps)}")
        if self.address and self.workers == 1:
            raise ValueError("--address runs on a Ray cluster; --workers 1 runs in-process: choose one")

    @property
    def context_list(self) -> list[str]:
        """The study's contexts (built-in names or YAML paths), as resolved when the configuration was made."""
        if self.contexts is None:
            raise ValueError("the study's contexts are resolved when the configuration is made")
        return list(self.contexts)

    @property
    def draws(self) -> int:
        """Draws per control and cell, as resolved when the configuration was made."""
        if self.n_random is None:
            raise ValueError("the draw count is resolved when the configuration is made")
        return self.n_random

    @property
    def n_workers(self) -> int:
        return self.workers if self.workers is not None else default_workers()

    @property
    def job_threads(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.n_workers)
