"""Reports in a real headless browser (issue 15): every image embedded and loaded, no sideways
overflow. Skipped without Playwright's client (the `browser` extra) or a Chromium on the machine."""
import pytest

pytest.importorskip("playwright")

from evaluations.browser_check import check_reports, find_chromium, main  # noqa: E402

pytestmark = pytest.mark.skipif(find_chromium() is None,
                                reason="no Chromium on this machine (apt-get install chromium)")


def _png(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3))
    ax.plot([0, 1], [0, 1])
    fig.savefig(path)
    plt.close(fig)
    return path


def test_a_report_page_renders_whole_and_a_broken_one_is_flagged(tmp_path):
    from evaluations.report import html_page, img_tag

    _png(tmp_path / "plot.png")
    long = "AUC 0.785; TPR@1% 0.000 [0.000, 0.001]; TPR@0.1% unresolved; 2304 neg."
    parts = html_page("t", "A report", "intro", ["probe"] + [f"group {i} (ε 8.00)" for i in range(4)],
                      [[f"probe{j}"] + [long] * 4 for j in range(12)], meta="What was run: method pfedpg")
    parts.append(img_tag(tmp_path / "plot.png", "plot"))
    (tmp_path / "good.html").write_text("\n".join(parts))
    (tmp_path / "bad.html").write_text("<!doctype html><img src='missing.png' alt='gone'>"
                                       "<table><tr><td style='white-space:nowrap'>" + "x" * 3000 + "</td></tr></table>")
    good, bad = check_reports([tmp_path / "good.html", tmp_path / "bad.html"])
    assert good["images"] == 1 and not good["broken"] and not good["external"] and not good["overflow"]
    assert (tmp_path / "good.png").stat().st_size > 10_000  # the screenshot
    assert bad["broken"] == ["gone"] and bad["external"] and bad["overflow"]
    assert main([str(tmp_path / "good.html")]) == 0 and main([str(tmp_path / "bad.html")]) == 1
