"""docs/commands.md and the CLI agree: every option of every command is documented in that command's section, and
every ``--option`` a section writes exists on its command."""

from __future__ import annotations

import re

import click
import pytest
from conftest import REPO, run_cli

from cerberus_histo.cli import main
from cerberus_histo.data.formats import FORMATS

DOC = REPO / "docs" / "commands.md"
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _sections() -> dict[str, str]:
    """``## name`` section of docs/commands.md -> its text, without HTML comments (the docs tests' directives)."""
    out: dict[str, str] = {}
    name = None
    for line in re.sub(r"<!--.*?-->", "", DOC.read_text(), flags=re.S).splitlines():
        if line.startswith("## "):
            name = line[3:].strip()
            out[name] = ""
        elif name is not None:
            out[name] += line + "\n"
    return out


def _commands():
    """``(section, path, command)`` for every command of the tree (``synth tiles`` is in section ``synth``)."""
    ctx = click.Context(main)
    for name in main.list_commands(ctx):
        cmd = main.get_command(ctx, name)
        if isinstance(cmd, click.Group):
            for sub in cmd.list_commands(ctx):
                yield name, f"{name} {sub}", cmd.get_command(ctx, sub)
        else:
            yield name, name, cmd


def _long_names(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params if isinstance(p, click.Option) for o in p.opts + p.secondary_opts
            if o.startswith("--") and o != "--help"}


COMMANDS = list(_commands())


def test_every_command_has_a_section():
    sections = _sections()
    missing = sorted({section for section, _, _ in COMMANDS} - set(sections))
    assert not missing, f"docs/commands.md lacks sections: {missing}"


@pytest.mark.parametrize("section, path, cmd", COMMANDS, ids=[p for _, p, _ in COMMANDS])
def test_every_option_is_documented(section, path, cmd):
    text = _sections()[section]
    written = set(OPTION.findall(text))
    missing = sorted(_long_names(cmd) - written)
    assert not missing, f"`cerberus {path}` options missing from the '## {section}' section: {missing}"


@pytest.mark.parametrize("section", sorted({s for s, _, _ in COMMANDS}))
def test_every_documented_option_exists(section):
    known = set().union(*(_long_names(cmd) for s, _, cmd in COMMANDS if s == section))
    unknown = sorted(set(OPTION.findall(_sections()[section])) - known - {"--help"})
    assert not unknown, f"the '## {section}' section names options that `cerberus {section}` lacks: {unknown}"


def test_import_dataset_help_lists_the_formats():
    proc = run_cli("import-dataset", "--help")
    assert proc.returncode == 0, proc.stderr
    for name, (_, _, description) in FORMATS.items():
        assert re.search(rf"^\s+{name}\s", proc.stdout, re.M), (name, proc.stdout)
        assert description.split(":")[0] in proc.stdout, (description, proc.stdout)
