"""Open the built documentation site in headless Chromium: the index, a method page and an API page. Checks
that each loads with no console error and no request leaving the machine, that the API page documents
parameters, and writes one screenshot per page under ``figures/docs/``.

    make docs                                   # builds docs/_build/html
    apt-get install chromium; pip install playwright   # the browser and its driver (not project dependencies)
    python analyses/check_docs_browser.py

Exit status 0 when every check passes.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "docs" / "_build" / "html"
OUT = ROOT / "figures" / "docs"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAGES = {"index": "index.html", "method_ig2": "methods/ig2.html", "api_eval": "_generated/api/eval.html"}


def main() -> int:
    if not (SITE / "index.html").exists():
        print(f"no built site at {SITE}: run `make docs` first", file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    report: dict[str, dict] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium", args=FLAGS)
        for key, rel in PAGES.items():
            errors: list[str] = []
            remote: list[str] = []
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m, e=errors: e.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda x, e=errors: e.append(str(x)))
            page.on("request", lambda r, q=remote: q.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
            page.goto((SITE / rel).as_uri())
            page.wait_for_load_state("load")
            info = {"title": page.title(), "console_errors": errors, "remote_requests": remote,
                    "h1": page.locator("h1").first.inner_text()}
            if key.startswith("api"):
                info["documented_parameters"] = page.locator("dl.field-list dt", has_text="Parameters").count()
                info["functions"] = page.locator("dl.py.function, dl.py.class").count()
            page.screenshot(path=str(OUT / f"{key}.png"), full_page=False)
            page.close()
            report[key] = info
        browser.close()
    print(json.dumps(report, indent=2))
    ok = all(not r["console_errors"] and not r["remote_requests"] for r in report.values())
    api = report["api_eval"]
    ok = ok and api["documented_parameters"] >= api["functions"] > 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
