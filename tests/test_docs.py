"""The docs' numbers and citations: the README's results table is what
benchmarks/results_table.py writes from the committed JSONs, and every result file the README,
the guide and the lab notebook cite is in benchmarks/results/."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "OPTIMIZATION_GUIDE.md", "docs/LAB_NOTEBOOK.md", "benchmarks/results/README.md"]
# a result file by its full name, with or without the folder in front; `git show <commit>:path`
# citations (files kept in git history only) are left out before matching
CITED = re.compile(r"(?<![A-Za-z0-9_])(\d{4}-\d\d-\d\d_[A-Za-z0-9_.+-]+?\.(?:json|log|png|txt))")
GIT_SHOW = re.compile(r"git show [0-9a-f<>^a-z]+:\S+")


def test_readme_results_table_is_what_the_script_writes():
    check = subprocess.run([sys.executable, "benchmarks/results_table.py", "--check", "README.md"],
                           cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_results_table_replaces_only_the_marked_block():
    sys.path.insert(0, str(ROOT))
    from benchmarks import results_table

    text = f"above\n{results_table.START}\nold\n{results_table.END}\nbelow\n"
    new = results_table.replace_block(text, "new\n")
    assert new == f"above\n{results_table.START}\nnew\n{results_table.END}\nbelow\n"
    with pytest.raises(ValueError):
        results_table.replace_block("no markers\n", "new\n")


@pytest.mark.parametrize("doc", DOCS)
def test_every_cited_result_file_exists(doc):
    text = GIT_SHOW.sub("", (ROOT / doc).read_text())
    cited = sorted(set(CITED.findall(text)))
    assert cited, f"{doc} cites no result file"
    missing = [name for name in cited if not (ROOT / "benchmarks/results" / name).is_file()]
    assert not missing, f"{doc} cites result files that are not in benchmarks/results/: {missing}"


def test_docs_link_each_other():
    readme = (ROOT / "README.md").read_text()
    guide = (ROOT / "OPTIMIZATION_GUIDE.md").read_text()
    notebook = (ROOT / "docs/LAB_NOTEBOOK.md").read_text()
    assert "OPTIMIZATION_GUIDE.md" in readme and "docs/LAB_NOTEBOOK.md" in readme
    assert "docs/LAB_NOTEBOOK.md" in guide
    assert "OPTIMIZATION_GUIDE.md" in notebook


def test_every_result_file_is_in_the_index():
    index = (ROOT / "benchmarks/results/README.md").read_text()
    files = sorted(p.name for p in (ROOT / "benchmarks/results").iterdir() if p.name != "README.md")
    unlisted = [name for name in files if name not in index]
    assert not unlisted, f"benchmarks/results/ files missing from its README.md: {unlisted}"
