"""The README is the front door: short, its method table is the registry, its links resolve."""

import re
from pathlib import Path

from dfkd.engine.method_choice import RULE
from dfkd.synthesis import methods_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_is_a_front_door():
    assert len(README.splitlines()) < 200


def test_readme_method_table_is_the_registry():
    table = re.search(r"<!-- methods table:[^\n]*-->\n(.*?)<!-- end of methods table -->",
                      README, re.S)
    assert table, "the README lost its methods-table markers"
    assert table.group(1) == methods_markdown(RULE), \
        "README method table is stale: paste `dfkd methods --markdown` between its markers"


def test_every_local_link_in_the_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_user_commands_carry_no_machine_local_paths():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```\n(.*?)```", page.read_text(), re.S):
            assert "../shared" not in block, f"{page.name}: a command with a machine-local path"
