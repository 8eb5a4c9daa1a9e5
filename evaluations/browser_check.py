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


def missing() -> str | None:
    """What the check lacks on this machine, as the line that says how to get it; None when ready."""
    import importlib.util

    if importlib.util.find_spec("playwright") is None:
        return "the browser check needs Playwright's Python client: pip install -e '.[browser]' (make venv does)"
    if find_chromium() is None:
        return (f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)} on PATH); install one, e.g. "
                "apt-get install chromium (nothing is downloaded)")
    return None


def main(argv: list[str] | None = None) -> int:
    """Check every report.html under the arguments; 0 when all pass, 1 when one fails, 2 (one line
    ``error: ...``) when there is nothing to check or the machine lacks Playwright or a Chromium."""
    dirs = [Path(a) for a in (argv if argv is not None else sys.argv[1:])] or [Path("runs")]
    reports = sorted({p for d in dirs for p in ([d] if d.suffix == ".html" else d.rglob("report.html"))})
    if not reports:
        print(f"error: no report.html under {', '.join(map(str, dirs))}; run `make demo` first (it writes "
              "runs/demo/report.html)", file=sys.stderr)
        return 2
    why = missing()
    if why is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    try:
        results = check_reports(reports)
    except Exception as e:  # the browser would not start (a broken install, a sandbox): one line, not a traceback
        print(f"error: Chromium at {find_chromium()} could not check the reports ({type(e).__name__}: "
              f"{' '.join(str(e).split())[:300]}); try another Chromium, e.g. apt-get install chromium",
              file=sys.stderr)
        return 2
    bad = 0
    for r in results:
        problems = ([f"{len(r['broken'])} broken image(s)"] if r["broken"] else []) + \
                   ([f"{len(r['external'])} image(s) not embedded"] if r["external"] else []) + \
                   ([f"overflows sideways ({r['scroll_width']} px > {r['viewport']} px)"] if r["overflow"] else [])
        bad += bool(problems)
        print(f"{'FAIL' if problems else 'ok  '} {r['path']}: {r['images']} images"
              + (f"; {'; '.join(problems)}" if problems else "") + f"; screenshot {r.get('screenshot')}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
