"""The README and docs/: every relative link and #section resolves, the README stays short and keeps
the test command, and the layout in docs/development.md names what the tree holds."""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MARKDOWN = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "weights" / "README.md"]
# [text](target) outside code; images and autolinks included. Targets with a scheme are external.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_BLOCK = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", CODE_BLOCK.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", CODE_BLOCK.sub("", path.read_text()), re.M)
    return {slug(h) for h in headings}


def relative_links(path: Path):
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue
        yield target


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_at_an_existing_file_and_heading(path):
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(REPO)}")
    assert not broken, f"{path.relative_to(REPO)}: {broken}"


def test_the_readme_links_every_docs_file():
    linked = {(REPO / target.partition("#")[0]).resolve() for target in relative_links(REPO / "README.md")}
    missing = [p.name for p in sorted((REPO / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not missing


def test_the_readme_is_short_and_gives_the_test_command_that_ci_runs():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert re.search(r"^\s+script/test\s*$", readme, re.M), "the two-command quick start runs `script/test`"
    assert "script/test" in (REPO / ".ci" / "run").read_text()


def layout_block() -> str:
    text = (REPO / "docs" / "development.md").read_text()
    section = text.split("## Layout", 1)[1]
    return re.search(r"```\n(.*?)```", section, re.S).group(1)


def tree():
    """What the layout must name: `find show1 bench script tests -maxdepth 2`, without caches and
    the fixtures' contents."""
    found = subprocess.run(
        ["find", "show1", "bench", "script", "tests", "-maxdepth", "2", "-not", "-path", "*/__pycache__*",
         "-not", "-path", "tests/fixtures/*"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()
    return [Path(p) for p in found if not p.endswith((".pyc", ".egg-info"))]


def test_the_layout_in_docs_development_names_every_file_and_folder_of_the_tree():
    block = layout_block()
    words = set(re.findall(r"[\w.\-]+", block))
    listed_tests = set(re.findall(r"\w+", block.split("test_*.py", 1)[1])) if "test_*.py" in block else set()
    missing = []
    for path in tree():
        name = path.name
        if path.parts[0] == "tests" and name.startswith("test_") and name.endswith(".py"):
            if name[len("test_"):-len(".py")] not in listed_tests:
                missing.append(str(path))
        elif name not in words and name.removesuffix(".py") not in words:
            missing.append(str(path))
    assert not missing, f"not in the layout of docs/development.md: {missing}"


def test_every_python_file_the_layout_names_exists():
    names = set(re.findall(r"\b[\w]+\.py\b", layout_block()))
    existing = {p.name for top in ("show1", "bench", "script", "tests") for p in (REPO / top).glob("**/*.py")}
    existing |= {p.name for p in REPO.glob("*.py")}
    assert not sorted(names - existing)
