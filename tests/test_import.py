"""A light import (issue 36): ``import mechbias`` loads no Ray, lm-eval or captum, and hashes no source files
(the study's code fingerprint is computed when a study first needs it)."""

import json
import subprocess
import sys


def test_import_loads_no_optional_heavy_package_and_hashes_nothing():
    probe = ("import sys, json\n"
             "import mechbias\n"
             "from mechbias.apps import store\n"
             "print(json.dumps({'loaded': [m for m in ('ray', 'lm_eval', 'captum') if m in sys.modules],\n"
             "                  'fingerprinted': bool(store._CODE_CACHE)}))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["loaded"] == [], got
    assert got["fingerprinted"] is False
