"""`python -m wan.integrate` (wan/tools/integrate.py) on a stand-in Matrix-Game-2 tree (the files
it recognises a checkout by, nothing runnable; a real checkout: tests/tools/test_matrix_game_checkout.py).
On a tree it recognises: apply (the diff shown, every decoder line changed, the DiT only where no
decoder line is found), idempotent, exact undo; on one it does not: refusal, untouched.
It is all or nothing: a write that fails at any point (the first, a middle one, the last: the
journal's completion; a failing os.replace; a read-only folder or file) leaves the checkout byte
for byte as it was, with one line of error and exit status 2; an install stopped part-way
(KeyboardInterrupt from a write, as a kill would) keeps its journal, `--status` says so and
`--undo` restores the tree from it; edited files get one way on, `--undo --force`; every user
error of the command line is one line on stderr and exit 2."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from wan.modules.optimized_vae_decoder import OptimizedVAEDecoderWrapper
from wan.tools import integrate
from wan.tools.integrate import (DECODER_FILES, DECODER_IMPORT, EDITS_DIR, MANIFEST,
                                 OPTIMIZED_DECODER_IMPORT, OPTIMIZED_IMPORT, RECOGNISED_BY,
                                 STATE_DIR, UPSTREAM_IMPORT, IntegrateError, install, status, undo)

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------- apply, idempotent, undo; refusals
def _fake_checkout(root: Path, decoder_lines: bool = True) -> Path:
    """The files the command recognises a Matrix-Game-2 tree by (nothing runnable)."""
    for relative, marker in RECOGNISED_BY.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(f"{marker}:\n    pass\n")
    wrapper = root / "utils" / "wan_wrapper.py"
    wrapper.write_text(f"import torch\n{UPSTREAM_IMPORT}\n\n\n{wrapper.read_text()}")
    (root / "wan" / "modules" / "optimized_causal_model.py").write_text("# the fork's template\n")
    (root / "tests").mkdir()
    (root / "tests" / "baseline_performance.txt").write_text("Mean: 166.60 ms\n")
    if decoder_lines:  # scripts that build upstream's decoder (one with CRLF line ends)
        (root / "inference.py").write_text(f"import os\n{DECODER_IMPORT}\nVAEDecoderWrapper()\n")
        (root / "server").mkdir()
        (root / "server" / "vae_cache.py").write_bytes(
            f"import torch\r\n{DECODER_IMPORT}\r\n".encode())
    return root


def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def test_integrate_applies_is_idempotent_and_undoes_exactly(tmp_path):
    root = _fake_checkout(tmp_path / "Matrix-Game-2")
    before = _tree(root)
    lines = []
    written = install(root, out=lines.append)
    assert "wan/kernels/registry.py" in written and "tests/test_causal_wan_model.py" in written
    assert OPTIMIZED_IMPORT in (root / "utils" / "wan_wrapper.py").read_text()
    assert any(line.startswith("--- a/utils/wan_wrapper.py") for line in lines)  # the diff shown
    assert (root / "tests" / "run_tests.sh").stat().st_mode & 0o111
    assert install(root, out=lines.append) == []  # again: nothing to do
    (root / "tests" / "baseline_performance.txt").write_text("Mean: 20.00 ms\n")  # the suite ran
    undo(root, out=lines.append)
    assert _tree(root) == before


def test_integrate_changes_every_decoder_line_shows_lists_and_undoes_them(tmp_path):
    root = _fake_checkout(tmp_path / "Matrix-Game-2")
    (root / "Matrix-Game-2.0").mkdir()
    upstream_cache = root / "Matrix-Game-2.0" / "compiled_vae_decoder.pt"
    upstream_cache.write_bytes(b"upstream's pickled compiled decoder")
    before = _tree(root)
    lines = []
    written = install(root, out=lines.append)
    assert {"inference.py", "server/vae_cache.py", *DECODER_FILES} <= set(written)
    assert (root / "inference.py").read_text() == \
        f"import os\n{OPTIMIZED_DECODER_IMPORT}\nVAEDecoderWrapper()\n"
    assert (root / "server" / "vae_cache.py").read_bytes() == \
        f"import torch\r\n{OPTIMIZED_DECODER_IMPORT}\r\n".encode()  # its line ends kept
    shown = "".join(lines)
    for relative in ("utils/wan_wrapper.py", "inference.py", "server/vae_cache.py"):
        assert f"--- a/{relative}" in shown
    assert f"-{DECODER_IMPORT}" in shown and f"+{OPTIMIZED_DECODER_IMPORT}" in shown
    # upstream's pickled decoder would be loaded in place of ours: moved away, put back by undo
    assert not upstream_cache.exists() and "moved   Matrix-Game-2.0/compiled_vae_decoder.pt" in shown
    listed = []
    status(root, out=listed.append)
    assert "the DiT and the decoder" in listed[0]
    assert f"  changed inference.py, line 2: {OPTIMIZED_DECODER_IMPORT}" in listed
    assert f"  changed server/vae_cache.py, line 2: {OPTIMIZED_DECODER_IMPORT}" in listed
    assert any(line.startswith("  changed utils/wan_wrapper.py, line 2:") for line in listed)
    assert install(root, out=lines.append) == []
    # what the optimized decoder's torch.save writes there meanwhile: undo deletes that marker
    decoder = OptimizedVAEDecoderWrapper()
    torch.save(decoder, upstream_cache)
    undo(root, out=lines.append)
    assert _tree(root) == before


def test_integrate_without_a_decoder_line_installs_the_dit_only(tmp_path):
    root = _fake_checkout(tmp_path / "Matrix-Game-2", decoder_lines=False)
    (root / "other.py").write_text("import demo_utils.vae_block3 as v\nv.VAEDecoderWrapper()\n")
    before = _tree(root)
    lines = []
    written = install(root, out=lines.append)
    assert "utils/wan_wrapper.py" in written and not set(DECODER_FILES) & set(written)
    assert not (root / "wan" / "modules" / "optimized_vae_decoder.py").exists()
    shown = "\n".join(lines)
    assert f"no file of {root} has the line `{DECODER_IMPORT}`: installed the DiT only" in shown
    assert "name upstream's decoder another way and keep it: other.py" in shown
    listed = []
    status(root, out=listed.append)
    assert "the DiT only, upstream decoder kept" in listed[0]
    undo(root, out=lines.append)
    assert _tree(root) == before


@pytest.mark.parametrize("case", ["decoder file of that name", "decoder line twice"])
def test_integrate_refuses_decoder_trees_it_does_not_recognise_untouched(tmp_path, case):
    root = _fake_checkout(tmp_path / "Matrix-Game-2")
    if case == "decoder file of that name":
        (root / "wan" / "modules" / "vae_decoder.py").write_text("# upstream's own\n")
        match = "wan/modules/vae_decoder.py exists and was not installed"
    else:
        (root / "inference.py").write_text(f"{DECODER_IMPORT}\n{DECODER_IMPORT}\n")
        match = "inference.py: expected the line .* exactly once, found it 2 times"
    before = _tree(root)
    with pytest.raises(SystemExit, match=match):
        install(root, out=lambda line: None)
    assert _tree(root) == before


def test_integrate_refuses_an_edited_install_on_undo(tmp_path):
    root = _fake_checkout(tmp_path / "Matrix-Game-2")
    install(root, out=lambda line: None)
    (root / "wan" / "kernels" / "registry.py").write_text("# edited\n")
    with pytest.raises(SystemExit, match="edited"):
        undo(root, out=lambda line: None)


def test_integrate_refuses_a_tree_it_does_not_recognise(tmp_path):
    (tmp_path / "Matrix-Game-2").mkdir()
    result = subprocess.run([sys.executable, "-m", "wan.integrate", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "is not a Matrix-Game-2 checkout" in result.stderr
    assert "wan/modules/causal_model.py is missing" in result.stderr
    assert "did you mean" in result.stderr and "Matrix-Game-2" in result.stderr
    assert list(tmp_path.rglob("*")) == [tmp_path / "Matrix-Game-2"]  # nothing written


def test_integrate_refuses_a_wrapper_it_does_not_recognise(tmp_path):
    root = _fake_checkout(tmp_path / "Matrix-Game-2")
    wrapper = root / "utils" / "wan_wrapper.py"
    wrapper.write_text(wrapper.read_text().replace(UPSTREAM_IMPORT, "from x import CausalWanModel"))
    before = _tree(root)
    with pytest.raises(SystemExit, match="exactly once"):
        install(root, out=lambda line: None)
    assert _tree(root) == before


# ---------------------------------------------------------------------- all or nothing
QUIET = dict(out=lambda line: None)


def _snapshot(root: Path) -> dict:
    """Every file's bytes and permission bits, and every folder, under `root`."""
    files, folders = {}, set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in dirnames:
            folders.add(Path(dirpath, name).relative_to(root).as_posix())
        for name in filenames:
            path = Path(dirpath, name)
            files[path.relative_to(root).as_posix()] = (path.read_bytes(), path.stat().st_mode)
    return {"files": files, "folders": folders}


def _checkout(tmp_path: Path) -> Path:
    """The stand-in checkout (_fake_checkout), with an upstream compiled decoder that
    the install moves aside (so a plan holds a move too)."""
    root = _fake_checkout(tmp_path / "Matrix-Game-2")
    (root / "Matrix-Game-2.0").mkdir()
    (root / "Matrix-Game-2.0" / "compiled_vae_decoder.pt").write_bytes(b"upstream's pickle")
    return root


def _status(root: Path) -> tuple:
    lines = []
    state = status(root, out=lines.append)
    return state, "\n".join(lines)


class FailAt:
    """Stands in for integrate._write_file: the `at`-th call (1-based) raises `error` (and every
    later one too where `persist`); the others write."""

    def __init__(self, at, error=None, persist=False):
        self.at, self.persist, self.calls = at, persist, 0
        self.error = error or OSError(28, "No space left on device")
        self.write = integrate._write_file

    def __call__(self, path, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at or (self.persist and self.calls > self.at):
            raise self.error
        return self.write(path, *args, **kwargs)


@pytest.fixture(scope="module")
def writes_per_install(tmp_path_factory) -> int:
    """How many writes a fresh install of _checkout makes (journal, saved originals, files, the
    journal's completion)."""
    counter = FailAt(at=0)
    integrate._write_file, original = counter, integrate._write_file
    try:
        install(_checkout(tmp_path_factory.mktemp("count")), **QUIET)
    finally:
        integrate._write_file = original
    assert counter.calls > 40
    return counter.calls


def _point(name: str, total: int) -> int:
    return {"first": 1, "second": 2, "middle": total // 2, "last": total}[name]


# ---------------------------------------------------------------------- a write fails: all back
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_failed_write_puts_the_checkout_back_byte_for_byte(tmp_path, monkeypatch,
                                                             writes_per_install, where):
    root = _checkout(tmp_path)
    before = _snapshot(root)
    monkeypatch.setattr(integrate, "_write_file", FailAt(_point(where, writes_per_install)))
    with pytest.raises(IntegrateError) as failed:
        install(root, **QUIET)
    message = failed.value.code
    assert "\n" not in message and "No space left on device" in message
    assert "every change was put back: the checkout is as it was" in message
    assert _snapshot(root) == before
    state, said = _status(root)
    assert state == "clean" and "has not installed anything here" in said
    monkeypatch.undo()  # the fault gone, the same install goes through, and undoes exactly
    install(root, **QUIET)
    assert _status(root)[0] == "installed"
    undo(root, **QUIET)
    assert _snapshot(root) == before


def test_a_failed_os_replace_leaves_no_temporary_file(tmp_path, monkeypatch, writes_per_install):
    root = _checkout(tmp_path)
    before = _snapshot(root)
    real, calls = os.replace, []

    def replace(source, target):
        calls.append(target)
        if len(calls) == writes_per_install // 2:
            raise PermissionError(13, "Permission denied", str(target))
        return real(source, target)

    monkeypatch.setattr(integrate.os, "replace", replace)
    with pytest.raises(IntegrateError, match="Permission denied.*the checkout is as it was"):
        install(root, **QUIET)
    monkeypatch.undo()
    assert _snapshot(root) == before  # the temporary file of the failed write is gone too


@pytest.mark.parametrize("where", [1, 3, 4])  # of 4: the journal, the saved original, the file,
def test_a_failed_update_keeps_the_install_before_it(tmp_path, monkeypatch, where):  # completion
    """A second install with something to do (a new script with upstream's decoder line) that
    fails: the first install stays as it was, its journal too."""
    root = _checkout(tmp_path)
    upstream = _snapshot(root)
    install(root, **QUIET)
    (root / "tools").mkdir()
    (root / "tools" / "decode.py").write_text(f"{integrate.DECODER_IMPORT}\n")
    installed = _snapshot(root)
    failing = FailAt(where)
    monkeypatch.setattr(integrate, "_write_file", failing)
    with pytest.raises(IntegrateError, match="the checkout is as it was"):
        install(root, **QUIET)
    assert _snapshot(root) == installed
    assert _status(root)[0] == "installed"
    failing.at, calls = 0, failing.calls  # no fault: the update goes through, in 4 writes
    assert install(root, **QUIET) == ["tools/decode.py"] and failing.calls == calls + 4
    undo(root, **QUIET)
    (root / "tools" / "decode.py").unlink()
    (root / "tools").rmdir()
    assert _snapshot(root) == upstream


def test_a_failure_that_the_rollback_meets_too_keeps_the_journal_for_undo(tmp_path, monkeypatch,
                                                                          writes_per_install):
    """The disk full from a middle write on: putting files back fails too; the journal (written
    first, with the whole plan) stays and --undo, once there is room, restores the tree."""
    root = _checkout(tmp_path)
    before = _snapshot(root)
    monkeypatch.setattr(integrate, "_write_file",
                        FailAt(writes_per_install // 2, persist=True))
    with pytest.raises(IntegrateError) as failed:
        install(root, **QUIET)
    assert "\n" not in failed.value.code
    assert f"journal {STATE_DIR}/{MANIFEST} is kept" in failed.value.code
    assert "--undo" in failed.value.code
    monkeypatch.undo()
    state, said = _status(root)
    assert state == "incomplete" and "--undo" in said
    undo(root, **QUIET)
    assert _snapshot(root) == before


# ---------------------------------------------------------------------- stopped part-way: --undo
@pytest.mark.parametrize("where", ["first", "second", "middle", "last"])
def test_undo_restores_an_install_that_was_stopped_part_way(tmp_path, monkeypatch,
                                                            writes_per_install, where):
    root = _checkout(tmp_path)
    before = _snapshot(root)
    monkeypatch.setattr(integrate, "_write_file",
                        FailAt(_point(where, writes_per_install), KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        install(root, **QUIET)
    monkeypatch.undo()
    if where == "first":  # stopped while writing the journal: nothing of the install is there
        assert _snapshot(root) == before and _status(root)[0] == "clean"
        return
    journal = json.loads((root / STATE_DIR / MANIFEST).read_text())
    assert journal["complete"] is False and journal["in_progress"]
    state, said = _status(root)
    assert state == "incomplete"
    assert "stopped part-way" in said and f"python -m wan.integrate --undo {root}" in said
    with pytest.raises(IntegrateError, match="stopped part-way.*--undo"):
        install(root, **QUIET)  # refuses, naming the one way on
    lines = []
    undo(root, out=lines.append)
    assert "(the install had stopped part-way)" in lines[0]
    assert _snapshot(root) == before
    install(root, **QUIET)  # and a fresh install goes through
    undo(root, **QUIET)
    assert _snapshot(root) == before


def test_undo_of_a_stopped_install_removes_a_temporary_file_left_by_a_kill(tmp_path, monkeypatch,
                                                                           writes_per_install):
    root = _checkout(tmp_path)
    before = _snapshot(root)
    monkeypatch.setattr(integrate, "_write_file",
                        FailAt(writes_per_install // 2, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        install(root, **QUIET)
    monkeypatch.undo()
    journal = json.loads((root / STATE_DIR / MANIFEST).read_text())
    pending = [rel for rel in journal["in_progress"] if (root / rel).parent.is_dir()]
    integrate._temp_for(root / pending[-1]).write_bytes(b"half a file")  # as a kill -9 leaves it
    undo(root, **QUIET)
    assert _snapshot(root) == before


# ---------------------------------------------------------------------- checked before writing
def _without_root_privileges():
    """The command prefix that makes a process obey file permissions: none for a user; for root,
    setpriv dropping the capabilities that override them (None where that does not work)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        return None
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o555)
        probe = subprocess.run([*prefix, sys.executable, "-c",
                                f"open({str(Path(folder) / 'x')!r}, 'w')"], capture_output=True)
        os.chmod(folder, 0o755)
    return prefix if probe.returncode != 0 else None


def test_a_really_read_only_folder_is_refused_or_rolled_back(tmp_path):
    """tests/ made read-only with chmod, the command run without the privileges that ignore it:
    refused before any write; and with the check switched off (as if it could not foresee the
    failure) the real EACCES of the first write into tests/ is rolled back."""
    prefix = _without_root_privileges()
    if prefix is None:
        pytest.skip("root, and no setpriv to drop the capabilities that ignore file permissions")
    root = _checkout(tmp_path)
    before = _snapshot(root)
    unchecked = ("import sys; from pathlib import Path; from wan.tools import integrate; "
                 "integrate._check_plan = lambda plan: None; sys.argv[1:] = [sys.argv[-1]]; "
                 "integrate.main()")
    (root / "tests").chmod(0o555)
    try:
        refused = subprocess.run([*prefix, sys.executable, "-m", "wan.integrate", str(root)],
                                 cwd=ROOT, capture_output=True, text=True, timeout=120)
        rolled_back = subprocess.run([*prefix, sys.executable, "-c", unchecked, str(root)],
                                     cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        (root / "tests").chmod(0o755)
    assert refused.returncode == 2 and refused.stdout == ""
    _one_line(refused, "the folder tests/ is read-only; nothing was changed")
    assert rolled_back.returncode == 2 and rolled_back.stdout == ""
    _one_line(rolled_back, "failed while writing tests/")
    assert "(Permission denied); every change was put back" in rolled_back.stderr
    assert _snapshot(root) == before
    assert _status(root)[0] == "clean"


def test_a_read_only_folder_as_the_check_sees_it_is_refused_untouched(tmp_path, monkeypatch):
    """The same refusal where the tests run as root (chmod stops no write of root's): the check
    asks os.access, answered here as for a read-only tests/."""
    root = _checkout(tmp_path)
    before = _snapshot(root)
    access = os.access
    monkeypatch.setattr(integrate.os, "access",
                        lambda path, mode: False if Path(path) == root / "tests"
                        else access(path, mode))
    monkeypatch.setattr(integrate, "_write_file", FailAt(1, AssertionError("a write happened")))
    with pytest.raises(IntegrateError, match="the folder tests/ is read-only; nothing was changed"):
        install(root, **QUIET)
    assert _snapshot(root) == before


def test_a_read_only_file_is_refused_untouched(tmp_path, capsys):
    root = _checkout(tmp_path)
    (root / "inference.py").chmod(0o444)
    before = _snapshot(root)
    result = _cli(root, capsys=capsys)
    assert result.returncode == 2
    _one_line(result, "inference.py is read-only; nothing was changed")
    assert _snapshot(root) == before


# ---------------------------------------------------------------------- edited files: one way on
def test_edited_files_have_one_way_on_undo_force(tmp_path):
    root = _checkout(tmp_path)
    before = _snapshot(root)
    install(root, **QUIET)
    edited = root / "wan" / "kernels" / "registry.py"
    edited.write_text("# my edit\n")
    wrapper = root / "utils" / "wan_wrapper.py"
    wrapper.write_text(wrapper.read_text() + "# my edit too\n")
    advice = f"python -m wan.integrate --undo --force {root}"
    state, said = _status(root)
    assert state == "edited" and "edited  wan/kernels/registry.py" in said and advice in said
    for call in (install, undo):
        with pytest.raises(IntegrateError) as refused:
            call(root, **QUIET)
        assert advice in refused.value.code and "run --undo first" not in refused.value.code
        assert "utils/wan_wrapper.py" in refused.value.code
    lines = []
    undo(root, out=lines.append, force=True)
    copies = sorted((root / EDITS_DIR).glob("*"))
    assert len(copies) == 1 and f"your edited files are in {EDITS_DIR}/" in lines[0]
    assert (copies[0] / "wan" / "kernels" / "registry.py").read_text() == "# my edit\n"
    assert (copies[0] / "utils" / "wan_wrapper.py").read_text().endswith("# my edit too\n")
    after = _snapshot(root)
    assert {k: v for k, v in after["files"].items() if not k.startswith(EDITS_DIR)} == \
        before["files"]
    # a new install does not read the copies (they hold changed decoder lines)
    install(root, **QUIET)
    assert not any(rel.startswith(EDITS_DIR) for rel in
                   json.loads((root / STATE_DIR / MANIFEST).read_text())["installed"])


def test_status_install_and_undo_after_installed_files_were_deleted_or_put_back(tmp_path):
    root = _checkout(tmp_path)
    before = _snapshot(root)
    install(root, **QUIET)
    installed = _snapshot(root)
    (root / "wan" / "kernels" / "registry.py").unlink()
    (root / "inference.py").write_bytes(before["files"]["inference.py"][0])  # upstream's again
    state, said = _status(root)
    assert state == "edited" and "deleted wan/kernels/registry.py" in said
    assert "back to upstream's original: inference.py" in said
    assert f"`python -m wan.integrate {root}` writes them again" in said
    assert install(root, **QUIET) == ["wan/kernels/registry.py", "inference.py"]
    assert _snapshot(root)["files"] == installed["files"]
    assert _status(root)[0] == "installed"
    (root / "utils" / "wan_wrapper.py").unlink()  # the tree is no longer one install recognises
    state, said = _status(root)
    assert state == "edited" and "an install now would refuse" in said and "--undo" in said
    undo(root, **QUIET)
    assert _snapshot(root) == before


def test_what_an_older_version_left_without_a_journal_is_explained(tmp_path, capsys):
    """An older wan.integrate stopped after writing files and before its manifest: every action
    says what to restore by hand, none writes."""
    root = _checkout(tmp_path)
    (root / STATE_DIR / "originals" / "wan" / "modules").mkdir(parents=True)
    (root / STATE_DIR / "originals" / "wan" / "modules" / "optimized_causal_model.py").write_text(
        "# the fork's template\n")
    (root / "wan" / "runtime").mkdir()
    (root / "wan" / "runtime" / "plan.py").write_text("# ours\n")
    before = _snapshot(root)
    for flags in ((), ("--status",), ("--undo",)):
        result = _cli(root, *flags, capsys=None if flags == ("--status",) else capsys)
        assert result.returncode == 2
        _one_line(result, "exists without its journal")
        assert "wan/modules/optimized_causal_model.py" in result.stderr
        assert "wan/runtime" in result.stderr
    assert _snapshot(root) == before


# ---------------------------------------------------------------------- the command line
class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _cli(root, *flags, capsys=None):
    """`python -m wan.integrate FLAGS ROOT` as a subprocess, or in this process through
    integrate.main where `capsys` is given (a new Python costs seconds on a busy CPU)."""
    if capsys is None:
        return subprocess.run([sys.executable, "-m", "wan.integrate", *flags, str(root)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    capsys.readouterr()
    try:
        integrate.main([*flags, str(root)])
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return _Result(code, out, err)


def _one_line(result, fragment):
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("wan.integrate: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def test_command_line_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    root = _checkout(tmp_path)
    (root / "broken.py").symlink_to(tmp_path / "nowhere.py")  # unreadable, also for root
    cases = [  # (flags, path, fragment, as a subprocess)
        ((), tmp_path / "missing", "does not exist", True),
        ((), root / "inference.py", "is not a folder", False),
        ((), tmp_path, "is not a Matrix-Game-2 checkout", False),
        (("--force",), root, "--force goes with --undo only", False),
        (("--bogus",), root, "unrecognized arguments: --bogus", True),
        (("--undo",), root, "has not installed anything here", False),
        ((), root, "cannot read broken.py: No such file or directory", True),
    ]
    for flags, path, fragment, separate in cases:
        result = _cli(path, *flags, capsys=None if separate else capsys)
        assert result.returncode == 2, (flags, path, result.stderr)
        _one_line(result, fragment)
    result = _cli(root, "--status", capsys=capsys)  # a state it can read: said, exit status 0
    assert result.returncode == 0 and "an install would refuse: cannot read broken.py" in \
        result.stdout
    (root / "broken.py").unlink()
    (root / STATE_DIR).mkdir()
    (root / STATE_DIR / MANIFEST).write_text("{not json")
    for flags in ((), ("--status",), ("--undo",)):
        result = _cli(root, *flags, capsys=capsys if flags else None)
        assert result.returncode == 2
        _one_line(result, "is unreadable")


def test_command_line_states_exit_codes_and_messages(tmp_path, capsys):
    root = _checkout(tmp_path)
    before = _snapshot(root)
    result = _cli(root, "--status")
    assert result.returncode == 0 and "has not installed anything here" in result.stdout
    assert "an install would change" in result.stdout
    result = _cli(root)
    assert result.returncode == 0 and result.stderr == ""
    result = _cli(root, "--status", capsys=capsys)
    assert result.returncode == 0 and "installed by wan.integrate" in result.stdout
    assert "up to date with this library" in result.stdout
    (root / "wan" / "kernels" / "registry.py").write_text("# edited\n")
    for flags, separate in (((), False), (("--undo",), True)):
        result = _cli(root, *flags, capsys=None if separate else capsys)
        assert result.returncode == 2
        _one_line(result, f"python -m wan.integrate --undo --force {root}")
    result = _cli(root, "--status", capsys=capsys)
    assert result.returncode == 0 and "edited  wan/kernels/registry.py" in result.stdout
    result = _cli(root, "--undo", "--force", capsys=capsys)
    assert result.returncode == 0, result.stderr
    files = {k: v for k, v in _snapshot(root)["files"].items() if not k.startswith(EDITS_DIR)}
    assert files == before["files"]


def test_command_line_interrupted_install_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch,
                                                                   writes_per_install):
    root = _checkout(tmp_path)
    before = _snapshot(root)
    monkeypatch.setattr(integrate, "_write_file",
                        FailAt(writes_per_install // 2, KeyboardInterrupt()))
    result = _cli(root, capsys=capsys)
    assert result.returncode == 130
    _one_line(result, "interrupted")
    monkeypatch.undo()
    result = _cli(root, "--status", capsys=capsys)
    assert result.returncode == 0 and "stopped part-way" in result.stdout
    result = _cli(root, capsys=capsys)
    assert result.returncode == 2
    _one_line(result, f"run `python -m wan.integrate --undo {root}` to restore the checkout")
    assert _cli(root, "--undo", capsys=capsys).returncode == 0
    assert _snapshot(root) == before
