"""`python -m wan.integrate PATH/TO/Matrix-Game-2`: put OptimizedCausalWanModel and
OptimizedVAEDecoderWrapper into a Matrix-Game-2 checkout, and take them out again (`--undo`).

Both projects name their package `wan`, so this library cannot be imported beside upstream's. It is
installed *into* upstream's package instead, as new files, plus one changed line per upstream file:

* new: `wan/runtime/` (what the optimized models run on: caches, plan, graphs, input checks) and
  `wan/kernels/` (the backends and kernels), `wan/modules/optimized_causal_model.py` (its
  parent is then the checkout's own CausalWanModel), `wan/modules/random_init.py` (random weights for the
  test suite), the seed's test suite (`tests/test_causal_wan_model.py`, `tests/run_tests.sh`,
  `tests/README.md`, `tests/QUICK_START.md`), and the decoder: `wan/modules/optimized_vae_decoder.py`
  with what it builds on, `wan/modules/vae_decoder.py` (this library's reference decoder) and
  `wan/modules/checkpoint.py`. Upstream has neither name (its decoder is
  `demo_utils/vae_block3.py`, its VAE `wan/modules/vae.py` and `wan/vae/`); a tree that has one is
  refused. The optimized decoder's parent is this library's reference, not upstream's class:
  upstream's decoder keeps its stream state in a list walked with a shared index and marker
  strings, which the optimized decoder does not read; what stays upstream's is the interface (the
  constructor, the state-dict names that `load_state_dict` of Wan2.1_VAE.pth's `decoder.`/`conv2`
  keys needs, the call and the cache list), checked against upstream's own decoder in
  tests/tools/test_matrix_game_checkout.py;
* changed: `utils/wan_wrapper.py`, whose import of `CausalWanModel` becomes the optimized class
  (so every pipeline WanDiffusionWrapper builds runs it), and every Python file of the tree that
  imports upstream's decoder with `from demo_utils.vae_block3 import VAEDecoderWrapper`
  (`inference.py`, `inference_streaming.py`; in the zoheth fork's later commits also
  `inference_webrtc.py`, `interactive_inference_server.py`, `server/model_manager.py`,
  `server/vae_cache.py`): that line imports OptimizedVAEDecoderWrapper under the same name.

A tree where no file has that decoder line gets the DiT only, with a message saying so: the DiT
line is independent of the decoder, and refusing would withhold the DiT's gain from a tree whose
scripts build their decoder some other way (files that name `vae_block3` in another form are listed
as keeping upstream's decoder). A `utils/wan_wrapper.py` without its line is refused untouched.

Upstream's `compiled_vae_decoder.pt` (the fork's inference.py caches its torch.compile'd decoder
there, pickled, and reads it back with `torch.load(weights_only=False)`) would be loaded in place of
the optimized decoder: any such file inside the checkout is moved under `.wan_integration/` (and
back by `--undo`). What the optimized decoder writes there instead is a marker without module or
weights (wan/modules/optimized_vae_decoder.py); `--undo` deletes such markers inside the checkout,
since upstream's decoder cannot read them.

Files that already exist there (the zoheth fork has a template `optimized_causal_model.py` and its
own suite) are saved under `.wan_integration/originals/` first, together with
`tests/baseline_performance.txt`, which the suite rewrites. `--undo` restores every saved file and
removes every installed one: the tree is then byte for byte what it was (the caches Python and
pytest write aside). Running the command again updates the installed files and changes nothing
else.

All or nothing. The command first plans every change (the bytes of every file it writes, every
file it saves or moves, every folder it creates) and checks that each can be made: the folders
writable, no file it replaces read-only (a file whose mode has no write bit counts as read-only,
for root too), nothing unreadable; a refusal changes nothing. Then it writes its journal,
`.wan_integration/manifest.json`, holding the whole plan and `"complete": false`, before any other
write. Every file is written to a temporary file in its own folder and moved over the target with
`os.replace`, so no file is ever half-written; the journal gets `"complete": true` last. If a step
fails (a full disk, a permission the check could not foresee), the command puts back every file it
changed, removes every file and folder it created (and the journal, or puts back the journal of the
install before) and ends with one line on stderr and exit status 2: the tree is byte for byte what
it was. If the process is stopped instead (Ctrl-C, a kill, a power cut) the journal stays:
`--undo` restores the checkout from it (it knows each file's content before and after, and accepts
either), `--status` says the install is incomplete, and an install refuses until `--undo` ran.

`--status` changes nothing and says which state the checkout is in: not installed (with what an
install would change, or why it would refuse); installed (every changed line with its number, the
saved originals, whether an install would now update files from this library); installed with
files edited or deleted since (which ones, and what to run); an install that stopped part-way (how
many of its files were written; run `--undo`); a `.wan_integration/` without a journal (what an
older version of this command left when it stopped part-way: what to restore by hand).

Edited files. An installed file that is neither what was installed nor upstream's original holds
the user's edits: neither an install (which would update it) nor `--undo` (which would delete or
restore it) overwrites it. Both refuse and name the one way on, `--undo --force`: it first copies
every edited file (and any file in the way of one moved back) to
`wan_integration_edits/<date-time>/` in the checkout, under its own path, then undoes. Install
again afterwards if wanted and re-apply the edits from that copy; the copy is the one thing
`--undo --force` leaves in the tree (delete it when done).

Errors. Every refusal and failure is one line on stderr, `wan.integrate: error: ...`, and exit
status 2 (the functions raise `IntegrateError`, a SystemExit whose code is the message, which
wan/tools/cli.py's `run` prints so); Ctrl-C is one line and exit status 130. `--status` exits 0 in every state it can read.

The seed's suite in an integrated checkout needs upstream's Python dependencies (its
requirements.txt; on a GPU machine all of it, flash_attn included). Where flash_attn is missing (a
CPU), `bash scripts/checkout_suite.sh CHECKOUT [correctness|benchmark|compare|all]` runs the
checkout's `./tests/run_tests.sh` with the stand-ins of tests/checkout/standins.py (only those the
machine lacks: flash_attn through SDPA, torchvision when its build does not fit, on a CPU upstream's
CUDA-only entry points), after checking that the checkout is integrated and its modules import.
"""
import difflib
import hashlib
import json
import os
import shutil
import stat
import time
from pathlib import Path

from . import cli

SOURCE_ROOT = Path(__file__).resolve().parents[2]
STATE_DIR = ".wan_integration"
MANIFEST = "manifest.json"
EDITS_DIR = "wan_integration_edits"  # where --undo --force copies edited files
FORMAT = 2  # of the manifest; manifests without "format" (older versions) were written complete
WRAPPER = "utils/wan_wrapper.py"
UPSTREAM_IMPORT = "from wan.modules.causal_model import CausalWanModel"
OPTIMIZED_IMPORT = ("from wan.modules.optimized_causal_model import OptimizedCausalWanModel as "
                    "CausalWanModel  # installed by wan.integrate (undo: python -m wan.integrate "
                    "--undo)")
DECODER_IMPORT = "from demo_utils.vae_block3 import VAEDecoderWrapper"
OPTIMIZED_DECODER_IMPORT = ("from wan.modules.optimized_vae_decoder import "
                            "OptimizedVAEDecoderWrapper as VAEDecoderWrapper  # installed by "
                            "wan.integrate (undo: python -m wan.integrate --undo)")
# this library's packages, copied whole (upstream's wan has neither name)
INSTALLED_PACKAGES = ("wan/runtime", "wan/kernels", "wan/modules/shared", "wan/modules/streaming")
# installed only with the decoder lines; upstream has no file of these names
DECODER_FILES = ("wan/modules/optimized_vae_decoder.py", "wan/modules/vae_decoder.py",
                 "wan/modules/checkpoint.py")
COMPILED_DECODER_CACHE = "compiled_vae_decoder.pt"  # where the fork's inference.py pickles one
SKIPPED_DIRS = {STATE_DIR, EDITS_DIR, "__pycache__", ".git", ".pytest_cache"}
# what a Matrix-Game-2 tree must hold for this command to touch it
RECOGNISED_BY = {
    "wan/modules/causal_model.py": "class CausalWanModel",
    "pipeline/causal_inference.py": "class CausalInferencePipeline",
    WRAPPER: "class WanDiffusionWrapper",
}
# files the suite rewrites when it runs: saved so that --undo brings them back
REWRITTEN_BY_THE_SUITE = ("tests/baseline_performance.txt",)
TEMP_SUFFIX = ".wan-integrate-tmp"  # `.<name>` + this: the temporary file beside each target


class IntegrateError(SystemExit):
    """A refusal or a failure of the command: its code is the one-line message (exit status 2)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split("\n")))


class NotMatrixGame2(IntegrateError):
    pass


def _command(root: Path, *flags) -> str:
    return " ".join(["python -m wan.integrate", *flags, str(root)])


def _force_advice(root: Path) -> str:
    return (f"run `{_command(root, '--undo', '--force')}`: it copies the edited files to "
            f"{EDITS_DIR}/<date-time>/ in the checkout, then restores the checkout (install again "
            f"afterwards and re-apply the edits from that copy)")


def _os_error(err: OSError, root: Path = None) -> str:
    """`<what> <path>: <reason>` of an OSError, the path relative to `root` where it lies inside."""
    name = err.filename
    if name is not None and root is not None:
        try:
            name = Path(name).relative_to(root).as_posix()
        except ValueError:
            pass
    reason = err.strerror or str(err)
    return f"{name}: {reason}" if name is not None else reason


# ---------------------------------------------------------------------- reading and writing files
def _read(path: Path, root: Path = None) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise IntegrateError(f"cannot read {_os_error(err, root)}") from None


def _text(path: Path, root: Path = None) -> str:
    return _read(path, root).decode("utf-8", errors="replace")


def _decoded(path: Path, root: Path = None) -> str:
    """A text file of the checkout, its line ends as they are."""
    try:
        return _read(path, root).decode()
    except UnicodeDecodeError as err:
        raise IntegrateError(f"{path.relative_to(root).as_posix() if root else path} is not UTF-8 "
                             f"text ({err.reason} at byte {err.start}); not changing it") from None


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha_of(path: Path, root: Path = None):
    """The file's sha256, None where there is no file."""
    return _sha(_read(path, root)) if path.is_file() else None


def _temp_for(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_SUFFIX}")


def _write_file(path: Path, data: bytes, mode: int = None, times=None):
    """Write `data` to `path` whole or not at all: into a temporary file in the same folder, then
    `os.replace` over `path`. `mode` (permission bits; default: the umask's for a new file) and
    `times` ((atime_ns, mtime_ns)) are set on the temporary file first. Every write of this module
    goes through here."""
    temp = _temp_for(path)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(temp, mode)
        if times is not None:
            os.utime(temp, ns=times)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


def _write_json(path: Path, manifest: dict):
    _write_file(path, json.dumps(manifest, indent=1, sort_keys=True).encode())


# ---------------------------------------------------------------------- what is installed
def installed_files(decoder: bool = True) -> dict:
    """{path in the checkout: path in this repository} of every file the command installs (the
    decoder's files too unless `decoder` is False)."""
    files = {"wan/modules/optimized_causal_model.py": "wan/modules/optimized_causal_model.py",
             "wan/modules/random_init.py": "wan/modules/random_init.py"}
    if decoder:
        files.update({name: name for name in DECODER_FILES})
    for package in INSTALLED_PACKAGES:
        for source in sorted((SOURCE_ROOT / package).rglob("*.py")):
            relative = source.relative_to(SOURCE_ROOT).as_posix()
            if source.name != "__main__.py":  # `python -m wan.kernels` is this repository's tool
                files[relative] = relative
    for name in ("test_causal_wan_model.py", "run_tests.sh", "README.md", "QUICK_START.md"):
        files[f"tests/{name}"] = f"tests/{name}"
    missing = [src for src in files.values() if not (SOURCE_ROOT / src).is_file()]
    if missing:
        raise IntegrateError(f"wan.integrate needs a clone of the wan repository (its tests/ "
                             f"folder); missing here: {', '.join(missing)}")
    return files


def check_tree(root: Path):
    """Refuse anything that is not a Matrix-Game-2 checkout, saying what is missing."""
    problems = []
    for relative, marker in RECOGNISED_BY.items():
        path = root / relative
        if not path.is_file():
            problems.append(f"{relative} is missing")
        elif marker not in _text(path, root):
            problems.append(f"{relative} does not define {marker.split()[-1]}")
    if problems:
        hint = ""
        if (root / "Matrix-Game-2").is_dir():
            hint = f" (did you mean {root / 'Matrix-Game-2'}?)"
        raise NotMatrixGame2(f"{root} is not a Matrix-Game-2 checkout: " + "; ".join(problems)
                             + hint)


def _swap_line(relative: str, text: str, old: str, new: str) -> str:
    """`text` with its one line `old` (any indentation) replaced by `new`; a file holding it more
    or less than once is refused."""
    lines = text.splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if line.strip() == old]
    if len(hits) != 1:
        raise NotMatrixGame2(f"{relative}: expected the line `{old}` exactly once, found it "
                             f"{len(hits)} times; not changing a file this command does not "
                             f"recognise")
    line = lines[hits[0]]
    ending = line[len(line.rstrip("\r\n")):] or "\n"
    lines[hits[0]] = line[:len(line) - len(line.lstrip())] + new + ending
    return "".join(lines)


def _walk(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        yield dirpath, sorted(filenames)


def _python_files(root: Path):
    for dirpath, filenames in _walk(root):
        for name in filenames:
            if name.endswith(".py"):
                yield Path(dirpath, name).relative_to(root).as_posix()


def decoder_sites(root: Path, skip=()):
    """(files whose decoder import line is changed, files that name vae_block3's decoder another
    way and keep upstream's), over every Python file of the tree but `skip`."""
    sites, others = [], []
    for relative in _python_files(root):
        if relative in skip or relative == "demo_utils/vae_block3.py":
            continue
        text = _text(root / relative, root)
        if any(line.strip() == DECODER_IMPORT for line in text.splitlines()):
            sites.append(relative)
        elif "vae_block3" in text and "VAEDecoderWrapper" in text:
            others.append(relative)
    return sites, others


def _is_marker(path: Path, root: Path = None) -> bool:
    """A compiled_vae_decoder.pt that the optimized decoder wrote (a marker, no module)."""
    from ..modules.optimized_vae_decoder import PICKLE_FORMAT
    return path.stat().st_size < 65536 and PICKLE_FORMAT.encode() in _read(path, root)


def _compiled_caches(root: Path) -> list:
    return [Path(dirpath, COMPILED_DECODER_CACHE).relative_to(root).as_posix()
            for dirpath, filenames in _walk(root) if COMPILED_DECODER_CACHE in filenames]


def _load_manifest(root: Path):
    """The journal, or None where there is none; an unreadable one is an error."""
    path = root / STATE_DIR / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(_read(path, root))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("installed"), dict):
            raise ValueError("not a wan.integrate manifest")
    except ValueError as err:
        raise IntegrateError(f"the journal {STATE_DIR}/{MANIFEST} of {root} is unreadable "
                             f"({err}); wan.integrate needs it to know what it installed") from None
    for key in ("saved", "created_dirs", "suite_outputs", "moved"):
        manifest.setdefault(key, [])
    manifest.setdefault("in_progress", {})
    manifest.setdefault("complete", True)  # older versions wrote their manifest last
    return manifest


def _patched_lines(manifest) -> dict:
    """{upstream file: its new line} of what is installed (manifests older than the decoder lines
    recorded only the wrapper)."""
    if "patched" in manifest:
        return manifest["patched"]
    return {WRAPPER: OPTIMIZED_IMPORT} if WRAPPER in manifest["installed"] else {}


def _orphaned(root: Path) -> bool:
    state = root / STATE_DIR
    return not (state / MANIFEST).exists() and state.is_dir() and any(state.iterdir())


def _orphaned_state(root: Path) -> str:
    """The one-line account of a .wan_integration/ without a journal (an older version of this
    command stopped after writing files and before its manifest)."""
    originals = root / STATE_DIR / "originals"
    saved = sorted(p.relative_to(originals).as_posix() for p in originals.rglob("*")
                   if p.is_file()) if originals.is_dir() else []
    added = [rel for rel in (*INSTALLED_PACKAGES, "wan/modules/random_init.py", *DECODER_FILES)
             if (root / rel).exists()]
    return (f"{root}/{STATE_DIR} exists without its journal {MANIFEST}: an older wan.integrate "
            f"stopped part-way here, and what it wrote cannot be undone automatically. By hand: "
            f"copy back the upstream files it saved ({', '.join(saved) or 'none'}: "
            f"`cp -a {root}/{STATE_DIR}/originals/. {root}/`), delete what it added "
            f"({', '.join(added) or 'none found'}; also any tests/ file of the seed's suite the "
            f"checkout did not have), then delete {root}/{STATE_DIR}")


# ---------------------------------------------------------------------- the file states
def _file_states(root: Path, manifest: dict) -> dict:
    """{installed file: 'installed' | 'not written' | 'original' | 'missing' | 'edited'}:
    'not written' is the content before an install that stopped part-way (the journal's
    in_progress), 'original' upstream's saved original."""
    states = {}
    for relative, sha in manifest["installed"].items():
        current = _sha_of(root / relative, root)
        saved = root / STATE_DIR / "originals" / relative
        if current == sha:
            states[relative] = "installed"
        elif relative in manifest["in_progress"] and current == manifest["in_progress"][relative]:
            states[relative] = "not written"
        elif current is None:
            states[relative] = "missing"
        elif relative in manifest["saved"] and saved.is_file() and current == _sha_of(saved, root):
            states[relative] = "original"
        else:
            states[relative] = "edited"
    return states


# ---------------------------------------------------------------------- install: plan, check, apply
class Plan:
    """Every change an install makes, computed without writing anything."""

    def __init__(self, root: Path):
        self.root = root
        self.manifest = None       # the journal once the install is complete
        self.previous = None       # the journal's bytes before this run (None: there was none)
        self.writes = []           # [(relative, data, mode)] in order
        self.before = {}           # {relative: (bytes, stat) or None} for every file written
        self.saves = []            # upstream files copied to originals/ first
        self.moves = []            # compiled caches moved under STATE_DIR/moved/
        self.new_dirs = []         # folders of the checkout to create, parents first
        self.diffs = []            # [(relative, text before, text after)] of the changed lines
        self.in_progress = {}      # {relative: sha before (None: no file)} of every file written
        self.decoder = False
        self.others = []

    @property
    def empty(self) -> bool:
        return not (self.writes or self.saves or self.moves
                    or self.manifest != json.loads(self.previous or "null"))


def _refuse_incomplete(root: Path, manifest: dict):
    if not manifest["complete"]:
        raise IntegrateError(f"an install into {root} stopped part-way (its journal "
                             f"{STATE_DIR}/{MANIFEST} is incomplete): run "
                             f"`{_command(root, '--undo')}` to restore the checkout, then install "
                             f"again")


def plan_install(root: Path) -> Plan:
    """What `install` would do, or the refusal (IntegrateError) it would end with. Writes
    nothing."""
    check_tree(root)
    plan = Plan(root)
    state = root / STATE_DIR
    manifest = _load_manifest(root)
    if manifest is None and _orphaned(root):
        raise IntegrateError(_orphaned_state(root))
    if manifest is not None:
        _refuse_incomplete(root, manifest)
        plan.previous = _read(state / MANIFEST, root)
        edited = [rel for rel, how in _file_states(root, manifest).items() if how == "edited"]
        if edited:
            raise IntegrateError(f"{', '.join(edited)}: edited since wan.integrate installed "
                                 f"{'it' if len(edited) == 1 else 'them'}; not overwriting the "
                                 f"edits: {_force_advice(root)}")
    manifest = json.loads(json.dumps(manifest)) if manifest else {
        "installed": {}, "saved": [], "created_dirs": [], "suite_outputs": [], "moved": []}
    manifest.update(format=FORMAT, complete=True, in_progress={})
    manifest["patched"] = patched = dict(_patched_lines(manifest))
    for package in INSTALLED_PACKAGES if not manifest["installed"] else ():
        if (root / package).exists():
            raise IntegrateError(f"{root / package} exists and was not installed by "
                                 f"wan.integrate; not overwriting it")

    sites, plan.others = decoder_sites(root, skip=set(manifest["installed"]) - set(patched))
    new_sites = [relative for relative in sites if relative not in patched]
    plan.decoder = decoder = bool(sites) or any(line == OPTIMIZED_DECODER_IMPORT
                                                for line in patched.values())
    for relative in DECODER_FILES if decoder else ():
        if (root / relative).exists() and relative not in manifest["installed"]:
            raise IntegrateError(f"{relative} exists and was not installed by wan.integrate (this "
                                 f"command installs the optimized decoder under that name); not "
                                 f"overwriting it")
    wanted = {dest: _read(SOURCE_ROOT / src)
              for dest, src in installed_files(decoder).items()}
    for relative, (old, new) in [*([(WRAPPER, (UPSTREAM_IMPORT, OPTIMIZED_IMPORT))]
                                   if WRAPPER not in patched else []),
                                 *[(site, (DECODER_IMPORT, OPTIMIZED_DECODER_IMPORT))
                                   for site in new_sites]]:
        text = _decoded(root / relative, root)
        wanted[relative] = _swap_line(relative, text, old, new).encode()
        plan.diffs.append((relative, text, wanted[relative].decode()))
        patched[relative] = new
    for relative in [rel for rel in patched if rel not in wanted]:
        # changed by the install before: the same change over upstream's saved original (which
        # also brings back a changed file deleted or put back to upstream's since)
        old, new = ((UPSTREAM_IMPORT, OPTIMIZED_IMPORT) if relative == WRAPPER
                    else (DECODER_IMPORT, OPTIMIZED_DECODER_IMPORT))
        original = state / "originals" / relative
        if original.is_file():
            wanted[relative] = _swap_line(relative, _decoded(original, root), old, new).encode()
            patched[relative] = new
        else:
            wanted[relative] = _read(root / relative, root)

    for relative, data in wanted.items():
        path = root / relative
        if path.exists() and not path.is_file():
            raise IntegrateError(f"{relative} is in the checkout but not a file; not replacing it")
        old = _read(path, root) if path.is_file() else None
        if old is not None and relative not in manifest["installed"]:  # upstream's: save it
            plan.saves.append(relative)
            manifest["saved"].append(relative)
        manifest["installed"][relative] = _sha(data)
        if old == data:
            continue
        plan.before[relative] = (old, path.stat()) if old is not None else None
        mode = 0o755 if relative.endswith(".sh") else (
            stat.S_IMODE(path.stat().st_mode) if old is not None else None)
        plan.writes.append((relative, data, mode))
        plan.in_progress[relative] = _sha(old) if old is not None else None
        for parent in reversed(Path(relative).parents[:-1]):
            folder = parent.as_posix()
            if not (root / parent).exists() and folder not in plan.new_dirs:
                plan.new_dirs.append(folder)
                manifest["created_dirs"].append(folder)

    for relative in REWRITTEN_BY_THE_SUITE:
        if relative in manifest["saved"] or relative in manifest["suite_outputs"]:
            continue
        if (root / relative).is_file():
            plan.saves.append(relative)
            manifest["saved"].append(relative)
        else:  # the suite will create it: undo deletes it
            manifest["suite_outputs"].append(relative)
    if decoder:  # upstream's pickled compiled decoder would be loaded in place of ours
        for relative in _compiled_caches(root):
            if not _is_marker(root / relative, root):
                if (state / "moved" / relative).exists():
                    raise IntegrateError(
                        f"{relative}: upstream's compiled decoder again, and the one moved away at "
                        f"install is still in {STATE_DIR}/moved/{relative}; delete one of them "
                        f"and run again")
                plan.moves.append(relative)
                manifest["moved"].append(relative)
    plan.manifest = manifest
    return plan


def _writable_folder(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def _read_only_file(path: Path) -> bool:
    return not os.access(path, os.W_OK) or not path.stat().st_mode & 0o222


def _nearest_existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _cannot_write(root: Path, files, folders) -> list:
    """The problems (one phrase each) that stop `files` (replaced or created) and entries of
    `folders` (created or removed in them) from being written; [] where all can be."""
    problems, seen = [], set()

    def folder_problem(folder: Path):
        existing = _nearest_existing(folder)
        if existing in seen:
            return
        seen.add(existing)
        name = existing.relative_to(root).as_posix() + "/" if existing != root else f"{root}/"
        if not existing.is_dir():
            problems.append(f"{name.rstrip('/')} is a file where a folder is needed")
        elif not _writable_folder(existing):
            problems.append(f"the folder {name} is read-only")

    for relative in files:
        path = root / relative
        folder_problem(path.parent)
        if path.is_file() and _read_only_file(path):
            problems.append(f"{relative} is read-only")
    for folder in folders:
        folder_problem(folder)
    return problems


def _check_plan(plan: Plan):
    root, state = plan.root, plan.root / STATE_DIR
    files = [rel for rel, _, _ in plan.writes]
    folders = [state if state.exists() else root]
    folders += [(root / rel).parent for rel in plan.moves]
    problems = _cannot_write(root, files, folders)
    if problems:
        shown = problems[:6] + ([f"and {len(problems) - 6} more"] if len(problems) > 6 else [])
        raise IntegrateError(f"cannot install into {root}: {'; '.join(shown)}; nothing was changed "
                             f"(make those writable and run again)")


class _Transaction:
    """What has been done so far, to put back in reverse order on a failure."""

    def __init__(self, root: Path):
        self.root = root
        self.done = []  # ("mkdir", path) | ("created", path) | ("replaced", path, bytes, stat)
        #                 | ("moved", from, to)

    def mkdirs(self, folder: Path):
        missing = []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for path in reversed(missing):
            os.mkdir(path)
            self.done.append(("mkdir", path))

    def write(self, path: Path, data: bytes, mode=None, times=None):
        old = (path.read_bytes(), path.stat()) if path.is_file() else None
        _write_file(path, data, mode, times)
        self.done.append(("replaced", path, *old) if old else ("created", path))

    def move(self, source: Path, target: Path):
        self.mkdirs(target.parent)
        shutil.move(source, target)
        self.done.append(("moved", source, target))

    def roll_back(self) -> list:
        """Undo everything done, newest first; returns the problems met (best effort). What lies
        under STATE_DIR (the journal, the saved originals) goes (or is put back) last, and only
        once everything in the checkout was put back: otherwise --undo needs it."""
        state = self.root / STATE_DIR
        inside, outside = [], []
        for step in self.done:
            (inside if step[1] == state or state in step[1].parents else outside).append(step)
        problems = self._roll_back(outside)
        return problems or self._roll_back(inside)

    def _roll_back(self, steps) -> list:
        problems = []
        for step in reversed(steps):
            try:
                if step[0] == "mkdir":
                    step[1].rmdir()
                elif step[0] == "created":
                    step[1].unlink()
                elif step[0] == "replaced":
                    _, path, data, st = step
                    _write_file(path, data, stat.S_IMODE(st.st_mode), (st.st_atime_ns,
                                                                       st.st_mtime_ns))
                elif step[0] == "moved":
                    shutil.move(step[2], step[1])
            except OSError as err:
                problems.append(_os_error(err, self.root))
        return problems


def _apply(plan: Plan):
    """Carry `plan` out, the journal first; on a failure put everything back and raise
    IntegrateError (a KeyboardInterrupt leaves the journal for --undo)."""
    root, state = plan.root, plan.root / STATE_DIR
    journal = dict(plan.manifest, complete=False, in_progress=plan.in_progress)
    done = _Transaction(root)
    step = "writing the journal"
    try:
        done.mkdirs(state)
        done.write(state / MANIFEST, json.dumps(journal, indent=1, sort_keys=True).encode())
        for folder in plan.new_dirs:
            step = f"creating {folder}/"
            done.mkdirs(root / folder)
        for relative in plan.saves:
            step = f"saving {relative} to {STATE_DIR}/originals/"
            source = root / relative
            st = source.stat()
            done.mkdirs((state / "originals" / relative).parent)
            done.write(state / "originals" / relative, _read(source, root),
                       stat.S_IMODE(st.st_mode), (st.st_atime_ns, st.st_mtime_ns))
        for relative, data, mode in plan.writes:
            step = f"writing {relative}"
            done.write(root / relative, data, mode)
        for relative in plan.moves:
            step = f"moving {relative} to {STATE_DIR}/moved/"
            done.move(root / relative, state / "moved" / relative)
        step = "completing the journal"
        _write_json(state / MANIFEST, plan.manifest)
    except KeyboardInterrupt:  # stopped, as by a kill: the journal stays for --undo
        if not (state / MANIFEST).is_file():  # none yet: nothing of the install is there
            done.roll_back()
        raise
    except BaseException as err:
        if isinstance(err, OSError) and str(err.filename or "").endswith(TEMP_SUFFIX):
            err.filename = None  # the temporary file of the target `step` names
        reason = _os_error(err, root) if isinstance(err, OSError) else (
            err.code if isinstance(err, SystemExit) else f"{type(err).__name__}: {err}")
        problems = done.roll_back()
        if problems:
            raise IntegrateError(
                f"install into {root} failed while {step} ({reason}), and putting the checkout "
                f"back failed too ({'; '.join(problems)}): its journal {STATE_DIR}/{MANIFEST} "
                f"is kept: fix that, then run `{_command(root, '--undo')}`") from None
        raise IntegrateError(f"install into {root} failed while {step} ({reason}); every change "
                             f"was put back: the checkout is as it was") from None


def install(root: Path, out=print) -> list:
    """Install (or update) into `root`, all or nothing; returns the list of paths it wrote."""
    plan = plan_install(root)
    if plan.empty:
        out(f"wan.integrate: {root} is up to date, nothing changed")
    else:
        _check_plan(plan)
        _apply(plan)
        for relative, before, after in plan.diffs:
            out("".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True),
                                             f"a/{relative}", f"b/{relative}")))
        written = [rel for rel, _, _ in plan.writes]
        out(f"wan.integrate: wrote {len(written)} file(s) into {root}:")
        for relative in written:
            out(f"  {'changed' if plan.before[relative] else 'added  '} {relative}")
        for relative in plan.moves:
            out(f"  moved   {relative} (upstream's pickled compiled decoder, which its "
                f"inference.py would load in place of the optimized one) to "
                f"{STATE_DIR}/moved/; --undo puts it back")
        out(f"  (saved originals: {', '.join(plan.manifest['saved']) or 'none'}; "
            f"undo: {_command(root, '--undo')})")
    if not plan.decoder:
        out(f"wan.integrate: no file of {root} has the line `{DECODER_IMPORT}`: installed the "
            f"DiT only; the scripts keep upstream's decoder (build "
            f"wan.modules.optimized_vae_decoder.OptimizedVAEDecoderWrapper yourself to use ours)")
    if plan.others:
        out(f"wan.integrate: these files name upstream's decoder another way and keep it: "
            f"{', '.join(plan.others)}")
    return [rel for rel, _, _ in plan.writes]


# ---------------------------------------------------------------------- undo
def undo(root: Path, out=print, force: bool = False) -> list:
    """Remove what `install` wrote and restore what it saved, from its journal (a complete install
    or one that stopped part-way); returns the paths touched. Edited installed files are refused
    unless `force`, which copies them to EDITS_DIR/<date-time>/ first."""
    state = root / STATE_DIR
    manifest = _load_manifest(root)
    if manifest is None:
        if _orphaned(root):
            raise IntegrateError(_orphaned_state(root))
        raise IntegrateError(f"{root}: wan.integrate has not installed anything here (no "
                             f"{STATE_DIR}/{MANIFEST})")
    states = _file_states(root, manifest)
    edited = [rel for rel, how in states.items() if how == "edited"]
    moved = manifest["moved"]
    # markers the optimized decoder's torch.save wrote (upstream's decoder cannot read them)
    markers = [rel for rel in _compiled_caches(root) if _is_marker(root / rel, root)]
    in_the_way = [rel for rel in moved if (state / "moved" / rel).exists()
                  and (root / rel).exists() and rel not in markers]
    if (edited or in_the_way) and not force:
        what = []
        if edited:
            what.append(f"{', '.join(edited)}: edited since wan.integrate installed "
                        f"{'it' if len(edited) == 1 else 'them'} (undo would lose the edits)")
        if in_the_way:
            what.append(f"{', '.join(in_the_way)}: a new file where --undo puts back the one "
                        f"moved away at install")
        raise IntegrateError(f"{'; '.join(what)}; not undoing: {_force_advice(root)}")
    lost = [rel for rel in manifest["saved"] if not (state / "originals" / rel).is_file()]
    if lost and manifest["complete"]:
        raise IntegrateError(
            f"the saved original(s) of {', '.join(lost)} are missing from {STATE_DIR}/originals/: "
            f"undo cannot restore them; nothing was changed (put upstream's version of each at "
            f"{root}/{STATE_DIR}/originals/<its path>, e.g. from git, and run again)")
    # a saved file whose copy is missing was never replaced (an install saves first): it stays
    restored = [rel for rel in manifest["saved"] if rel not in lost]
    removed = [rel for rel in [*manifest["installed"], *manifest["suite_outputs"], *markers]
               if (root / rel).is_file() and rel not in manifest["saved"]]
    back = [rel for rel in moved if (state / "moved" / rel).exists()]
    temps = [_temp_for(root / rel) for rel in [*manifest["installed"], *manifest["saved"]]
             if _temp_for(root / rel).is_file()]  # left by a process killed mid-write
    problems = _cannot_write(root, [*restored, *back], [
        *((root / rel).parent for rel in [*removed, *restored, *back]),
        *((root / rel).parent for rel in manifest["created_dirs"]), root, state])
    if problems:
        raise IntegrateError(f"cannot undo in {root}: {'; '.join(problems)}; nothing was changed "
                             f"(make those writable and run again)")
    copies = None
    try:
        if force and (edited or in_the_way):
            copies = root / EDITS_DIR / time.strftime("%Y%m%d-%H%M%S")
            for rel in [*edited, *in_the_way]:
                (copies / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / rel, copies / rel)
        for path in temps:
            path.unlink()
        for rel in removed:
            (root / rel).unlink()
        for rel in restored:
            original = state / "originals" / rel
            st = original.stat()
            _write_file(root / rel, _read(original, root), stat.S_IMODE(st.st_mode),
                        (st.st_atime_ns, st.st_mtime_ns))
        for rel in back:
            if (root / rel).exists():  # a marker (deleted above) or, with force, copied away
                (root / rel).unlink()
            shutil.move(state / "moved" / rel, root / rel)
        for rel in sorted(manifest["created_dirs"], key=lambda p: -p.count("/")):
            folder = root / rel
            if (folder / "__pycache__").is_dir():  # only in folders this command created
                shutil.rmtree(folder / "__pycache__")
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        shutil.rmtree(state)
    except OSError as err:
        raise IntegrateError(f"undo in {root} stopped ({_os_error(err, root)}); the journal "
                             f"{STATE_DIR}/{MANIFEST} is kept: fix that and run "
                             f"`{_command(root, '--undo')}` again") from None
    out(f"wan.integrate: undone in {root}: restored {len(restored)} file(s) "
        f"({', '.join(restored) or 'none'}), removed {len(removed)}"
        + (f", put back {', '.join(back)}" if back else "")
        + (f", deleted the optimized decoder's marker(s) {', '.join(markers)}" if markers else "")
        + ("" if manifest["complete"] else " (the install had stopped part-way)")
        + (f"; your edited files are in {copies.relative_to(root).as_posix()}/" if copies else ""))
    return removed + restored + back


# ---------------------------------------------------------------------- status
def status(root: Path, out=print) -> str:
    """Say what state `root` is in and return it: 'clean', 'installed', 'edited' (installed, with
    files edited or deleted since) or 'incomplete'. Changes nothing."""
    manifest = _load_manifest(root)
    if manifest is None:
        if _orphaned(root):
            raise IntegrateError(_orphaned_state(root))
        check_tree(root)
        try:
            plan = plan_install(root)
        except IntegrateError as err:
            out(f"{root}: a Matrix-Game-2 checkout; wan.integrate has not installed anything here, "
                f"and an install would refuse: {err.code}")
            return "clean"
        changed = [rel for rel, _, _ in plan.writes if plan.before[rel]]
        added = len(plan.writes) - len(changed)
        out(f"{root}: a Matrix-Game-2 checkout; wan.integrate has not installed anything here "
            f"(an install would change {', '.join(changed)} and add {added} file(s)"
            + (f", and move {', '.join(plan.moves)} aside" if plan.moves else "") + ")")
        return "clean"
    states = _file_states(root, manifest)
    patched = _patched_lines(manifest)
    decoder = any(line == OPTIMIZED_DECODER_IMPORT for line in patched.values())
    if not manifest["complete"]:
        written = sum(how == "installed" for how in states.values())
        out(f"{root}: an install by wan.integrate stopped part-way ({written} of {len(states)} "
            f"files written; journal {STATE_DIR}/{MANIFEST}): run `{_command(root, '--undo')}` to "
            f"restore the checkout, then install again")
        for relative in [rel for rel, how in states.items() if how == "edited"]:
            out(f"  edited  {relative} (neither what the install wrote nor what was there)")
        return "incomplete"
    out(f"{root}: installed by wan.integrate ({len(manifest['installed'])} files; the DiT"
        f"{' and the decoder' if decoder else ' only, upstream decoder kept'}; saved originals: "
        f"{', '.join(manifest['saved']) or 'none'})")
    for relative, line in sorted(patched.items()):
        path = root / relative
        text = _text(path, root).splitlines() if path.is_file() else []
        number = next((i + 1 for i, got in enumerate(text) if got.strip() == line), None)
        where = f"line {number}" if number else ("LINE MISSING" if path.is_file()
                                                 else "FILE DELETED")
        out(f"  changed {relative}, {where}: {line}")
    for relative in manifest["moved"]:
        out(f"  moved   {relative} -> {STATE_DIR}/moved/{relative}")
    edited = [rel for rel, how in states.items() if how == "edited"]
    missing = [rel for rel, how in states.items() if how == "missing"]
    reverted = [rel for rel, how in states.items() if how == "original"]
    for relative in edited:
        out(f"  edited  {relative} (since the install)")
    for relative in missing:
        out(f"  deleted {relative} (since the install)")
    for relative in reverted:
        out(f"  back to upstream's original: {relative} (since the install)")
    if edited:
        out(f"  --undo and an install refuse while files are edited: {_force_advice(root)}")
        return "edited"
    try:
        plan = plan_install(root)
    except IntegrateError as err:
        out(f"  an install now would refuse: {err.code}; `{_command(root, '--undo')}` restores "
            f"the checkout")
        return "edited" if missing or reverted else "installed"
    if missing or reverted:
        out(f"  `{_command(root)}` writes them again; `{_command(root, '--undo')}` restores the "
            f"checkout")
        return "edited"
    if plan.empty:
        out("  up to date with this library")
    else:
        out(f"  an install now would update {len(plan.writes)} file(s) from this library: "
            f"`{_command(root)}`")
    return "installed"


# ---------------------------------------------------------------------- the command
PROG = "python -m wan.integrate"
LABEL = "wan.integrate"  # what its one-line errors start with


def parse_args(argv=None):
    p = cli.ArgumentParser(prog=PROG, label=LABEL, description=__doc__.split("\n\n")[0])
    p.add_argument("checkout", type=Path, help="the Matrix-Game-2 folder (holding wan/, pipeline/, "
                                               "utils/, configs/)")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--undo", action="store_true", help="restore the checkout as it was")
    action.add_argument("--status", action="store_true",
                        help="say what is installed, change nothing")
    p.add_argument("--force", action="store_true",
                   help=f"with --undo: undo even where installed files were edited, copying them "
                        f"to {EDITS_DIR}/<date-time>/ in the checkout first")
    args = p.parse_args(argv)
    if args.force and not args.undo:
        p.error("--force goes with --undo only")
    return args


def main(argv=None):
    return cli.run(PROG, _main, argv, label=LABEL, interrupted=lambda: (
        f"if an install was under way its journal {STATE_DIR}/{MANIFEST} records it: "
        f"`python -m wan.integrate --status CHECKOUT` says what to do"))


def _main(argv=None):
    args = parse_args(argv)
    try:
        root = args.checkout.resolve()
        if not root.exists():
            raise IntegrateError(f"{root} does not exist")
        if not root.is_dir():
            raise IntegrateError(f"{root} is not a folder")
        if args.undo:
            undo(root, force=args.force)
        elif args.status:
            status(root)
        else:
            install(root)
    except OSError as err:  # what the checks could not foresee (nothing half-written)
        raise IntegrateError(_os_error(err)) from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
