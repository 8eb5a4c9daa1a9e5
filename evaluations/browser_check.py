"""Render HTML reports in a real headless browser and check what a reader sees (issue 15):
every image loads, nothing overflows the page sideways, and a full-page screenshot is written
beside each report (``report.png``).

Needs the ``browser`` extra (``pip install '.[browser]'``, i.e. Playwright's Python client) and a
Chromium on the machine (e.g. Debian's ``apt-get install chromium``; no browser download).
``python -m evaluations.browser_check DIR ...`` checks every ``report.html`` under the DIRs and
prints one line per report; ``make report-check`` runs it on the demo's output.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def check_reports(paths: list[Path], *, width: int = 1280, screenshot: bool = True) -> list[dict]:
    """One dict per report: images, broken images, page and viewport widths, overflow, screenshot."""
    from playwright.sync_api import sync_playwright

    exe = find_chromium()
    if exe is None:
        raise RuntimeError("no Chromium found (looked for " + ", ".join(CHROMIUM_NAMES) + "); install one, e.g. "
                           "apt-get install chromium")
    out = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            for path in paths:
                page.goto(Path(path).resolve().as_uri())
                page.wait_for_load_state("load")
                info = page.evaluate("""() => {
                    const imgs = Array.from(document.images);
                    return {images: imgs.length,
                            broken: imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt),
                            scroll_width: document.documentElement.scrollWidth,
                            viewport: window.innerWidth,
                            external: imgs.filter(i => !i.src.startsWith('data:')).map(i => i.src)};
                }""")
                info["path"] = str(path)
                info["overflow"] = info["scroll_width"] > info["viewport"]
                if screenshot:
                    shot = Path(path).with_suffix(".png")
                    page.screenshot(path=str(shot), full_page=True)
                    info["screenshot"] = str(shot)
                out.append(info)
        finally:
            browser.close()
    return out


def main(argv: list[str] | None = None) -> int:
    dirs = [Path(a) for a in (argv if argv is not None else sys.argv[1:])] or [Path("runs")]
    reports = sorted({p for d in dirs for p in ([d] if d.suffix == ".html" else d.rglob("report.html"))})
    if not reports:
        print(f"no report.html under {', '.join(map(str, dirs))}", file=sys.stderr)
        return 2
    bad = 0
    for r in check_reports(reports):
        problems = ([f"{len(r['broken'])} broken image(s)"] if r["broken"] else []) + \
                   ([f"{len(r['external'])} image(s) not embedded"] if r["external"] else []) + \
                   ([f"overflows sideways ({r['scroll_width']} px > {r['viewport']} px)"] if r["overflow"] else [])
        bad += bool(problems)
        print(f"{'FAIL' if problems else 'ok  '} {r['path']}: {r['images']} images"
              + (f"; {'; '.join(problems)}" if problems else "") + f"; screenshot {r.get('screenshot')}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
