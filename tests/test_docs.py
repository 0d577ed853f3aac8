"""The README and docs/ say what the code does: its commands, options and catalogue keys are all
named, its links lead somewhere, and its two command lines are the ones CI and the nightly run.

tox -e docs builds docs/ with MkDocs in strict mode (links between pages and their anchors);
these tests need no MkDocs, so they run in the unit tier.
"""

from __future__ import annotations

import argparse
import configparser
import re
from collections.abc import Iterator

from conftest import ROOT
from racker import cli
from racker.pytest import plugin
from racker.store import catalog

DOCS = ROOT / "docs"


def pages() -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted(DOCS.glob("*.md"))}


def everything() -> str:
    return (ROOT / "README.md").read_text() + "\n".join(pages().values())


def named(option: str, text: str) -> bool:
    """`option` appears as a word of its own: --results is not named by --racker-results."""
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def test_the_readme_starts_with_the_two_command_lines() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```sh\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.rsplit("#", 1)[1].strip() for line in first_block] == ["main", "tests"]
    tests_line = first_block[1]
    envs = re.search(r"tox -e (\S+)", tests_line).group(1).split(",")  # type: ignore[union-attr]
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    assert envs == ["lint", "unit", "docs"] and all(tox.has_section(f"testenv:{env}") for env in envs)


def test_every_relative_link_of_the_readme_leads_to_a_file() -> None:
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    relative = [link for link in links if "://" not in link]
    assert relative, "the README links to docs/"
    assert [link for link in relative if not (ROOT / link).exists()] == []


def test_every_page_is_linked_from_the_readme_and_in_mkdocs_nav() -> None:
    readme = (ROOT / "README.md").read_text()
    nav = (ROOT / "mkdocs.yml").read_text()
    for name in pages():
        assert f"docs/{name}" in readme, name
        assert re.search(rf":\s*{re.escape(name)}\s*$", nav, re.MULTILINE), name


def test_the_catalogue_table_lists_every_key_catalog_accepts() -> None:
    table = pages()["images.md"].split("## The catalogue", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \|", table, re.MULTILINE)
    assert rows == list(catalog.KEYS)


def commands(parser: argparse.ArgumentParser, prefix: str = "racker") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from commands(sub, f"{prefix} {name}")


def test_every_command_and_option_of_the_cli_is_named() -> None:
    text = everything()
    missing = []
    for command, parser in commands(cli.build_parser(None)):
        if command not in text:
            missing.append(command)
        for action in parser._actions:
            strings = [s for s in action.option_strings if s not in ("-h", "--help")]
            if strings and not any(named(s, text) for s in strings):
                missing.append(f"{command} {strings[-1]}")
    assert missing == []


class _Options:
    """Collects what racker.pytest.plugin.pytest_addoption declares (a pytest.Parser's two methods)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def getgroup(self, *args: object) -> _Options:
        return self

    def addoption(self, *names: str, **kwargs: object) -> None:
        self.names += names

    def addini(self, name: str, *args: object, **kwargs: object) -> None:
        self.names.append(name)


def test_every_plugin_option_and_ini_setting_is_named_on_the_plugin_page() -> None:
    options = _Options()
    plugin.pytest_addoption(options)  # type: ignore[arg-type]
    assert len(options.names) > 10
    page = pages()["pytest.md"]
    assert [name for name in options.names if not named(name, page)] == []
