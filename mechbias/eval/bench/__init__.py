"""External bias benchmarks read from their public file formats (none is shipped): CrowS-Pairs, StereoSet
intrasentence, BBQ and WinoBias, each for the unmodified model and under an intervention, with paired cluster
bootstrap intervals (:mod:`.common`)."""

from .bbq import bbq_score, read_bbq
from .common import BenchResult, MetricRow
from .crowspairs import crows_bench
from .stereoset import read_stereoset, stereoset_score
from .winobias import read_winobias, winobias_score

__all__ = ["BenchResult", "MetricRow", "bbq_score", "crows_bench", "read_bbq", "read_stereoset", "read_winobias",
           "stereoset_score", "winobias_score"]
