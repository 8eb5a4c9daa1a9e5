"""The documentation site: its reference pages are generated from the code (every command, config key
and registered plug-in is on them), and `mkdocs build --strict` passes (no broken link or anchor)."""
import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from evaluations import docgen
from evaluations.cli import cli

ROOT = Path(__file__).resolve().parent.parent


def _walk(cls, key=""):
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        path = f"{key}.{f.name}" if key else f.name
        yield path
        if dataclasses.is_dataclass(default):
            yield from _walk(type(default), path)


def test_the_cli_reference_has_every_command_and_every_option():
    page = docgen.cli_reference()
    ctx = click.Context(cli, info_name="pfedpg-eval")
    assert len(cli.commands) >= 8
    for name, cmd in cli.commands.items():
        assert f"\n## {name}\n" in page and f"Usage: pfedpg-eval {name}" in page
        section = page.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
        for p in cmd.get_params(click.Context(cmd, info_name=name, parent=ctx)):
            for opt in [p.human_readable_name] if isinstance(p, click.Argument) else p.opts:
                assert opt in section, (name, opt)  # each option and argument in its own command's section
        if cmd.epilog:
            assert cmd.epilog.removeprefix("Example:").strip() in section
    for opt in ("--quiet", "--verbose", "--version"):  # the group's own options
        assert opt in page.split("\n## ", 1)[0]


def test_the_config_reference_has_every_key_with_its_default_and_comment():
    from evaluations.privacy import PrivacySweepConfig
    from evaluations.robustness import RobustnessConfig
    from pfedpg.config import RunConfig

    page = docgen.config_reference()
    for path in _walk(RunConfig):
        assert f"| `{path}` |" in page, path
    for key, cls in (("privacy", PrivacySweepConfig), ("robustness", RobustnessConfig)):
        for path in _walk(cls, key):
            assert f"| `{path}` |" in page, path
    row = next(ln for ln in page.splitlines() if ln.startswith("| `client.local_epochs` |"))
    assert row == "| `client.local_epochs` | `int` | `1` | E (paper: 5) |"  # type, default and the source's comment
    row = next(ln for ln in page.splitlines() if ln.startswith("| `clients_per_round` |"))
    assert "`int | None` | `null` |" in row  # a pipe inside a code span stays unescaped


@dataclasses.dataclass
class _Commented:
    plain: int = 1
    # above, line one
    # above, line two
    both: str = "x"  # beside
    #: a doc comment
    multi: dict = dataclasses.field(
        default_factory=dict)  # on its last line
    bare: float = 0.5

    def method(self):  # not a field
        return self.plain


def test_field_comments_reads_the_lines_above_and_the_end_of_line():
    assert docgen.field_comments(_Commented) == {
        "plain": "", "both": "above, line one above, line two beside", "multi": "a doc comment on its last line",
        "bare": ""}


def test_the_plugin_reference_has_every_registered_name_and_option():
    page = docgen.plugin_reference()
    for title, _, registry, given in docgen._registries():
        section = page.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
        for name in registry.names():
            assert f"\n### {name}\n" in section, (title, name)
    dp_client = page.split("\n### dp_client\n", 1)[1].split("\n### ", 1)[0]
    for option, default in (("clip", "(required)"), ("delta", "`1e-05`"), ("adjacency", "`replace`"),
                            ("accountant", "`rdp`"), ("noise", "`seeded`")):
        assert f"| `{option}` | {default} |" in dp_client
    norm_clip = page.split("\n### norm_clip\n", 1)[1].split("\n### ", 1)[0]
    assert "| `radius` |" in norm_clip and "| `f` |" not in norm_clip  # f comes from the grid, not the config


def test_docgen_prints_a_page_and_refuses_an_unknown_one():
    run = [sys.executable, "-m", "evaluations.docgen"]
    out = subprocess.run(run + ["cli"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.startswith("# CLI reference")
    bad = subprocess.run(run + ["nope"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and "usage: python -m evaluations.docgen cli|config|plugins" in bad.stderr


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                    reason="the site needs the docs extra: pip install -e '.[docs]' (make test installs it)")
def test_the_site_builds_strict_with_the_generated_pages(tmp_path):
    site = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                           capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert build.returncode == 0, build.stderr[-3000:]
    cli_page = (site / "reference" / "cli" / "index.html").read_text()
    for name in cli.commands:
        assert f'id="{name}"' in cli_page, name
    assert 'id="evaluations.api.privacy_sweep"' in (site / "reference" / "api" / "index.html").read_text()
    api_page = (site / "api" / "index.html").read_text()
    assert "api.privacy_sweep" in api_page and "sweep_file" in api_page  # the example's code, included
    bench = (site / "benchmarks" / "index.html").read_text()
    first = next(ln for ln in (ROOT / "bench" / "README.md").read_text().splitlines() if ln.startswith("## "))
    assert re.sub(r"[`*]", "", first[3:]).split(" (")[0] in bench  # bench/README.md, included
