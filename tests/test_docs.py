"""The README and docs/ hold together: every relative link resolves, every anchor names a heading, every page is
reachable from the front page and leads back to it.

    python -m pytest tests/test_docs.py          # well under a second, no model

Links are read as GitHub renders them: `[text](target)` and `![alt](target)` outside code (fenced blocks and
inline code spans are skipped); a target is relative to the file that holds it; `#anchor` is a heading's slug by
GitHub's rule (lowercase, punctuation other than `-` and `_` dropped, spaces to `-`, a repeated heading gets
`-1`, `-2`, ...). No link points into a gitignored path today, so none is excused.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link and image in the page's prose."""
    return [(number, m.group(1)) for number, line in prose_lines(page.read_text())
            for m in LINK.finditer(CODE_SPAN.sub("", line))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors on its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(page.read_text()):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target)) or target.startswith("//")


def test_slug_follows_githubs_rule():
    assert slug("Margins and drift: what every run measures") == "margins-and-drift-what-every-run-measures"
    assert slug("The first run: `two_round`") == "the-first-run-two_round"
    assert slug("Resume, failures and what survives what") == "resume-failures-and-what-survives-what"
    assert slug("Search: beta, learning rate, or any field") == "search-beta-learning-rate-or-any-field"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_and_every_anchor_is_a_heading(page):
    broken = []
    for number, target in links(page):
        if is_external(target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(ROOT)}:{number}: {target}"
        if not dest.exists():
            broken.append(f"{where}: no such file")
        elif not dest.is_relative_to(ROOT):
            broken.append(f"{where}: outside the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme_and_links_back():
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in links(README) if not is_external(t)}
    assert DOCS, "docs/ holds no page"
    unlinked = [str(p.relative_to(ROOT)) for p in DOCS if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link to: {unlinked}"
    no_way_back = [str(p.relative_to(ROOT)) for p in DOCS
                   if README.resolve() not in {(p.parent / t.partition("#")[0]).resolve() for _, t in links(p)}]
    assert not no_way_back, f"docs pages with no link back to the README: {no_way_back}"


def test_the_readme_keeps_the_test_command_ci_runs():
    """.ci/run runs the README's test command verbatim: the two must not drift apart."""
    readme = README.read_text()
    section = readme.split("## Run the tests\n", 1)[1]
    command = section.split("```bash\n", 1)[1].split("\n```", 1)[0]
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_readmes_grid_example_is_the_shipped_config():
    """The front page's one example is configs/two_round.yaml without its comments: the same YAML, value for value."""
    import yaml

    readme = README.read_text().split("## A grid file\n", 1)[1]
    example = readme.split("```yaml\n", 1)[1].split("\n```", 1)[0]
    assert yaml.safe_load(example) == yaml.safe_load((ROOT / "configs" / "two_round.yaml").read_text())


def test_every_test_the_docs_name_exists():
    """The guarantees table (docs/reliability.md) and the other pages name the tests that hold each promise."""
    defined = {m.group(1) for path in (ROOT / "tests").glob("test_*.py")
               for m in re.finditer(r"^\s*(?:async\s+)?def (test_\w+)", path.read_text(), re.M)}
    missing = []
    for page in PAGES:
        text = page.read_text()
        for name in set(re.findall(r"`(?:tests/test_\w+\.py::)?(test_\w+)`", text)):
            if name not in defined:
                missing.append(f"{page.relative_to(ROOT)}: {name}")
        for path in set(re.findall(r"`(tests/test_\w+\.py)", text)):
            if not (ROOT / path).exists():
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, "tests named in the docs but not found:\n" + "\n".join(sorted(missing))
