"""MkDocs hook: the reference pages generated from the code (``evaluations.docgen``) at build time."""
from __future__ import annotations

from mkdocs.structure.files import File

from evaluations import docgen

PAGES = {"reference/cli.md": docgen.cli_reference, "reference/config.md": docgen.config_reference,
         "reference/plugins.md": docgen.plugin_reference}


def on_files(files, config):
    for uri, render in PAGES.items():
        files.append(File.generated(config, uri, content=render()))
    return files
