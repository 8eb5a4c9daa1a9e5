"""The documentation's reference pages, generated from the code at build time (``mkdocs build``
calls them through ``docs/hooks/reference.py``), so they cannot drift from it:

* :func:`cli_reference` — every ``pfedpg-eval`` command from the click group: what it does, its
  usage, every option with its help and default, its example;
* :func:`config_reference` — every config key from the typed config dataclasses: its type, its
  default and the comment beside it in the source; the grid files' sections too;
* :func:`plugin_reference` — every registered hook, aggregation rule, probe, generator and
  accountant with its options and defaults.

``python -m evaluations.docgen cli|config|plugins`` prints one of them.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import sys
import textwrap
import tokenize
from typing import Any

import click

PROG = "pfedpg-eval"


def _md(text: str) -> str:
    """Docstring prose as Markdown: Sphinx roles (``:func:`x```) become code spans."""
    return re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", text)


def _cell(text: str) -> str:
    """Text for one Markdown table cell: one line, its pipes escaped outside code spans (inside one,
    a pipe does not split the cell and a backslash would show)."""
    parts = re.split(r"(`[^`]*`)", " ".join(str(text).split()))
    return "".join(p if p.startswith("`") else p.replace("|", "\\|") for p in parts)


def _help_paragraphs(text: str) -> list[str]:
    """click help text as Markdown blocks, each followed by a blank line: a ``\\b`` paragraph is
    kept verbatim (a code block)."""
    out = []
    for para in re.split(r"\n\s*\n", inspect.cleandoc(text or "")):
        if para.startswith("\b"):
            out += ["```text\n" + textwrap.dedent(para[1:].strip("\n")) + "\n```", ""]
        elif para.strip():
            out += [" ".join(para.split()), ""]
    return out


def _options_table(cmd: click.Command, ctx: click.Context) -> list[str]:
    rows = ["| option | what it does |", "|---|---|"]
    args = []
    for p in cmd.get_params(ctx):
        if isinstance(p, click.Argument):
            args.append(f"`{p.make_metavar(ctx) if _takes_ctx(p) else p.make_metavar()}`")
            continue
        rec = p.get_help_record(ctx)
        if rec is not None:
            rows.append(f"| {_cell('`' + rec[0] + '`')} | {_cell(rec[1])} |")
    return (["Arguments: " + ", ".join(args), ""] if args else []) + rows


def _takes_ctx(p: click.Parameter) -> bool:
    return "ctx" in inspect.signature(p.make_metavar).parameters


def cli_reference(group: click.Group | None = None) -> str:
    """The CLI reference page: the group's options, then every command in turn."""
    if group is None:
        from evaluations.cli import cli as group
    ctx = click.Context(group, info_name=PROG)
    lines = ["# CLI reference", "",
             f"Generated from the `{PROG}` click group when the site is built: every command, its options and their "
             f"defaults, as `{PROG} COMMAND --help` prints them.", "",
             f"```text\n{group.get_usage(ctx)}\n```", "", *_help_paragraphs(group.help),
             "Options of the group (before the command):", "", *_options_table(group, ctx), ""]
    lines += ["| command | what it does |", "|---|---|"]
    names = list(group.list_commands(ctx))
    for name in names:
        cmd = group.get_command(ctx, name)
        lines.append(f"| [`{name}`](#{name}) | {_cell(cmd.get_short_help_str(limit=200))} |")
    for name in names:
        cmd = group.get_command(ctx, name)
        sub = click.Context(cmd, info_name=name, parent=ctx)
        lines += ["", f"## {name}", "", f"```text\n{cmd.get_usage(sub)}\n```", "", *_help_paragraphs(cmd.help),
                  *_options_table(cmd, sub)]
        if cmd.epilog:
            example = cmd.epilog.removeprefix("Example:").strip()
            lines += ["", "Example:", "", f"```bash\n{example}\n```"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Config keys from the dataclasses: type, default and the source's comments


def field_comments(cls: type) -> dict[str, str]:
    """Each dataclass field's comments in the source: the comment lines right above it and the one
    at the end of its line (``#:`` or ``#``)."""
    src = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    alone: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            line = tok.start[0]
            comments[line] = tok.string.lstrip("#:").strip()
            if not tok.line[:tok.start[1]].strip():
                alone.add(line)
    body = ast.parse(src).body[0]
    out = {}
    for node in body.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, line = [], node.lineno - 1
            while line in alone:
                above.insert(0, comments[line])
                line -= 1
            inline = [comments[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1)
                      if n in comments and n not in alone]
            out[node.target.id] = " ".join(above + inline)
    return out


def _annotations(cls: type) -> dict[str, str]:
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    return {n.target.id: ast.unparse(n.annotation) for n in body.body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _yaml(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f"`{value}`"
    return f"`{value!r}`".replace("'", "")


def _section(cls: type, key: str, level: int, title: str | None = None) -> list[str]:
    """One config section's table (under ``title``, default the key), then its nested sections."""
    notes, types = field_comments(cls), _annotations(cls)
    doc = _md(inspect.cleandoc(cls.__doc__)) if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") \
        else ""
    lines = [f"{'#' * level} {title or (f'`{key}`' if key else 'Top level')}", "",
             f"`{cls.__module__}.{cls.__name__}`", ""]
    if doc:
        lines += [doc, ""]
    lines += ["| key | type | default | what it sets |", "|---|---|---|---|"]
    nested = []
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        path = f"{key}.{f.name}" if key else f.name
        default = _default(f)
        if dataclasses.is_dataclass(default):
            nested.append((type(default), path))
            lines.append(f"| `{path}` | section | | see [`{path}`](#{path.replace('.', '')}) |")
            continue
        lines.append(f"| `{path}` | {_cell('`' + types.get(f.name, '') + '`')} | {_cell(_yaml(default))} | "
                     f"{_cell(_md(notes.get(f.name, '')))} |")
    for sub, path in nested:
        lines += ["", *_section(sub, path, level + 1 if level < 3 else 3)]
    return lines


def config_reference() -> str:
    """The config reference page: a run config's sections, then the grid files' sections."""
    from evaluations.privacy import PrivacySweepConfig
    from evaluations.robustness import RobustnessConfig
    from pfedpg.config import RunConfig

    lines = ["# Config reference", "",
             "Generated from the typed config dataclasses when the site is built: every key, its type, its default and "
             "the comment beside it in the source. A run config is YAML with these keys; every key is optional; an "
             "unknown key is an error that lists the valid ones. On the command line, `--set key.sub=value` sets any "
             "of them (values parsed as YAML: `--set rounds=5`, `--set data.new_clients=[0,1]`, "
             "`--set model.checkpoint=null`). A run directory's `config.yaml` holds the resolved config, every "
             "default filled in.", "",
             "## Run config", "", *_section(RunConfig, "", 3), "",
             "## Grid files", "",
             "A privacy sweep, an audit and a robustness matrix are grid files with three top-level keys: "
             "`base_config` (a run config's path, read from the grid file's own folder when relative), `base` "
             "(overrides of it, merged section by section) and the grid's own section below. `--set` applies to the "
             "base run config.", "",
             *_section(PrivacySweepConfig, "privacy", 3, "`privacy:` in a sweep file"), "",
             "### `audit:` in an audit file", "",
             "An audit file's `audit:` section takes the `privacy` keys above (its baselines: `nonprivate`, "
             "`clip_only`; default `[nonprivate]`; `out_dir` default `runs/audit`) and three more: `probes` (the "
             "[`leakage_audit`](plugins.md#leakage_audit) hook's options), `client_canaries` (the "
             "[`client_canary_audit`](plugins.md#client_canary_audit) hook's options, added to the cells without "
             "DP-SGD) and `gradient_canaries` ([`gradient_canary_audit`](plugins.md#gradient_canary_audit)'s, added "
             "to the DP-SGD cells).", "",
             *_section(RobustnessConfig, "robustness", 3, "`robustness:` in a matrix file")]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Plug-ins: every registry's names and options


def _options(obj: Any) -> list[tuple[str, Any]]:
    """A registered class's keyword options with their defaults, its bases' where ``**kwargs`` passes
    them on (a registered function: its own keyword parameters)."""
    out: dict[str, Any] = {}
    for klass in getattr(obj, "__mro__", (None,)):
        init = obj if klass is None else klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        params = inspect.signature(init).parameters
        for p, v in params.items():
            if p != "self" and v.kind in (v.KEYWORD_ONLY, v.POSITIONAL_OR_KEYWORD) and p not in out:
                out[p] = dataclasses.MISSING if v.default is inspect.Parameter.empty else v.default
        if not any(v.kind == v.VAR_KEYWORD for v in params.values()):
            break
    return list(out.items())


def _first_paragraph(obj: Any) -> str:
    """The first paragraph of the object's own docstring (not one it inherits)."""
    if not obj.__doc__:
        return ""
    return _md(" ".join(inspect.cleandoc(obj.__doc__).split("\n\n")[0].split()))


def _registries() -> list[tuple[str, str, Any, tuple[str, ...]]]:
    """(title, where it is named in a config, registry, options supplied by the code, not the config)."""
    from attacks.probes import PROBE_TYPES
    from defenses.accounting import ACCOUNTANT_TYPES
    from defenses.robust import AGGREGATION_RULES
    from evaluations.plugins import load_plugins
    from pfedpg.generators import GENERATORS
    from pfedpg.hooks import HOOKS

    load_plugins()
    return [("Hooks", "`hooks: [{name: NAME, option: value}]`", HOOKS, ()),
            ("Robust aggregation rules", "`robust_aggregation`'s `rule` (its options beside `rule`)",
             AGGREGATION_RULES, ("f",)),
            ("Leakage probes", "`leakage_audit`'s `probes` (a name, or `{name: NAME, option: value}`)",
             PROBE_TYPES, ()),
            ("Prompt generators", "`server.generator` (a name, or `{name: NAME, option: value}`)", GENERATORS,
             ("num_prompts", "dim")),
            ("Accountants", "a DP hook's `accountant`", ACCOUNTANT_TYPES, ())]


def plugin_reference() -> str:
    """The plug-in reference page: each registry's entries with their options and defaults."""
    lines = ["# Plug-in reference", "",
             "Generated from the registries when the site is built: every name a config may use, with the options "
             "its class takes (a wrong option is a one-line error listing these). Plug-ins registered at run time "
             "(your own hook, rule or probe) join the same registries; see "
             "[Add an attack, a rule or a probe](../how-to/extend.md)."]
    from attacks.probes import PROBE_TYPES

    for title, where, registry, given in _registries():
        lines += ["", f"## {title}", "", f"Named in {where}.", ""]
        for name in registry.names():
            cls = registry.get(name)
            opts = [(k, v) for k, v in _options(cls) if k not in given and not k.startswith("_")]
            lines += [f"### {name}", "", f"`{cls.__module__}.{cls.__qualname__}`", ""]
            para = _first_paragraph(cls)
            if para:
                lines += [para, ""]
            if registry is PROBE_TYPES:
                lines += [f"Threat model: `{cls.side}`; unit: `{cls.unit}`; needs the server's auxiliary data "
                          f"(shadow clients): {'yes' if cls.needs_aux else 'no'}.", ""]
            if opts:
                lines += ["| option | default |", "|---|---|"]
                lines += [f"| `{k}` | {_cell(_yaml(v))} |" for k, v in opts]
            else:
                lines.append("No options.")
            lines.append("")
    return "\n".join(lines) + "\n"


PAGES = {"cli": cli_reference, "config": config_reference, "plugins": plugin_reference}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in PAGES:
        sys.exit(f"usage: python -m evaluations.docgen {'|'.join(PAGES)}")
    print(PAGES[sys.argv[1]](), end="")
