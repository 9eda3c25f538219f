"""Open a study's report.html in a real headless browser and check it: no console errors, every matrix shown,
and hovering a cell shows its numbers. Writes a screenshot.

    apt-get install chromium          # Debian's browser (not a project dependency)
    pip install playwright            # the Python driver; its own browser download is not needed
    python analyses/check_report_browser.py results/study/report.html --screenshot figures/report_html.png

Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("page", type=Path)
    ap.add_argument("--screenshot", type=Path, default=None)
    ap.add_argument("--browser", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args()
    source = args.page.read_text()
    expected = source.count("data-matrix=")
    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.browser, args=FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
        page.goto(args.page.resolve().as_uri())
        page.wait_for_load_state("load")
        shown = page.locator("table[data-matrix]").count()
        visible = sum(page.locator("table[data-matrix]").nth(i).is_visible() for i in range(shown))
        cell = page.locator("td.cell").first
        cell.hover()
        tip = page.locator("#tip")
        tip_text = tip.inner_text() if tip.is_visible() else ""
        want = cell.get_attribute("data-tip") or ""
        if args.screenshot:
            args.screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.screenshot), full_page=False)
        browser.close()
    report = {"matrices_in_file": expected, "matrices_shown": shown, "matrices_visible": visible,
              "console_errors": errors, "network_requests": requests,
              "hover_shows_cell_numbers": bool(tip_text) and tip_text.strip() == want.strip(),
              "hover_text": tip_text.splitlines()[:3]}
    print(json.dumps(report, indent=2))
    ok = (shown == expected == visible and expected > 0 and not errors and not requests
          and report["hover_shows_cell_numbers"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
