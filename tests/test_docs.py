"""The docs stay true: the README's numbers table is what docs/results_table.py writes from the
committed JSONs, every other number in the README's prose is one of that table's or a constant of
Matrix-Game-2 named below, every link and repository path the README gives exists, the README
stays short, and every result file the docs cite is in benchmarks/results/."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
GUIDES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
DOCS = ["README.md", "OPTIMIZATION_GUIDE.md", "benchmarks/results/README.md", *GUIDES]
# a result file by its full name, with or without the folder in front; `git show <commit>:path`
# citations (files kept in git history only) are left out before matching
CITED = re.compile(r"(?<![A-Za-z0-9_])(\d{4}-\d\d-\d\d_[A-Za-z0-9_.+-]+?\.(?:json|log|png|txt))")
GIT_SHOW = re.compile(r"git show [0-9a-f<>^a-z]+:\S+")
MAX_README_LINES = 250

# Numbers the README's prose may give without a result file: facts of Matrix-Game-2's model and
# call pattern (the design brief), and of the command lines. A measured number goes in the table.
CONSTANTS = {
    "1.6e9": "the DiT's parameters",
    "3": "latent frames per block",
    "4": "forwards per block (3 denoising steps and the cache update)",
    "12": "video frames per block",
    "25": "frames per second of real time",
    "480": "ms between blocks in real time (12 frames at 25 fps)",
    "44": "latent height",
    "80": "latent width",
    "2": "the command lines' exit status for a user's mistake",
}
# a number standing alone: not part of a name (float64, Wan2.1, Matrix-Game-2.0, step34)
NUMBER = re.compile(r"(?<![\w.\-/])\d+(?:\.\d+)?(?:e\d+)?(?!\.?\d)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"`((?:wan|tests|benchmarks|scripts|configs|docs)/[^`\s:*]*)`")


def _load_results_table():
    spec = importlib.util.spec_from_file_location("results_table", ROOT / "docs/results_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _split_readme():
    """(the generated table's text, the prose: the README without it, its code blocks and
    inline code, and link targets)."""
    text = README.read_text()
    table = _load_results_table()
    head, rest = text.split(table.START, 1)
    block, tail = rest.split(table.END, 1)
    prose = re.sub(r"```.*?```", "", head + tail, flags=re.S)
    prose = re.sub(r"`[^`]*`", "", prose)
    prose = re.sub(r"\]\([^)]*\)", "]", prose)
    prose = re.sub(r"https?://\S+", "", prose)
    return block, prose


def test_readme_results_table_is_what_the_script_writes():
    check = subprocess.run([sys.executable, "docs/results_table.py", "--check", "README.md"],
                           cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_results_table_replaces_only_the_marked_block():
    results_table = _load_results_table()
    text = f"above\n{results_table.START}\nold\n{results_table.END}\nbelow\n"
    new = results_table.replace_block(text, "new\n")
    assert new == f"above\n{results_table.START}\nnew\n{results_table.END}\nbelow\n"
    with pytest.raises(ValueError):
        results_table.replace_block("no markers\n", "new\n")


def test_every_number_in_the_readme_comes_from_the_table_or_is_a_constant():
    block, prose = _split_readme()
    from_table = set(NUMBER.findall(block))
    unsourced = sorted({n for n in NUMBER.findall(prose) if n not in from_table and n not in CONSTANTS})
    assert not unsourced, (
        f"README numbers with no source: {unsourced}; a measured number belongs in the table "
        f"(docs/results_table.py, from a committed result JSON) or in a docs/ page that names its "
        f"result file")


def test_the_number_check_sees_numbers_and_not_names():
    assert NUMBER.findall("a 41.6 ms block, 4.9x, 1.6e9 weights, 12-frame.") == ["41.6", "4.9", "1.6e9", "12"]
    assert NUMBER.findall("float64 Wan2.1 Matrix-Game-2.0 step34 x-2 a/3") == []


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES})"


@pytest.mark.parametrize("doc", ["README.md", *GUIDES])
def test_every_link_points_to_an_existing_file(doc):
    path = ROOT / doc
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    targets = [t.split("#")[0] for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]
    missing = [t for t in targets if t and not (path.parent / t).exists()]
    assert not missing, f"{doc} links to files that do not exist: {missing}"


def test_every_repository_path_in_the_readme_exists():
    text = re.sub(r"```.*?```", "", README.read_text(), flags=re.S)
    missing = [p for p in REPO_PATH.findall(text) if not (ROOT / p).exists()]
    assert not missing, f"README.md names paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_cited_result_file_exists(doc):
    text = GIT_SHOW.sub("", (ROOT / doc).read_text())
    cited = sorted(set(CITED.findall(text)))
    missing = [name for name in cited if not (ROOT / "benchmarks/results" / name).is_file()]
    assert not missing, f"{doc} cites result files that are not in benchmarks/results/: {missing}"


def test_docs_link_each_other():
    readme = README.read_text()
    for doc in GUIDES:
        assert doc in readme, f"the README does not lead to {doc}"
    assert "OPTIMIZATION_GUIDE.md" in readme
    assert "docs/LAB_NOTEBOOK.md" in (ROOT / "OPTIMIZATION_GUIDE.md").read_text()
    assert "OPTIMIZATION_GUIDE.md" in (ROOT / "docs/LAB_NOTEBOOK.md").read_text()


def test_every_result_file_is_in_the_index():
    index = (ROOT / "benchmarks/results/README.md").read_text()
    files = sorted(p.name for p in (ROOT / "benchmarks/results").iterdir() if p.name != "README.md")
    unlisted = [name for name in files if name not in index]
    assert not unlisted, f"benchmarks/results/ files missing from its README.md: {unlisted}"
