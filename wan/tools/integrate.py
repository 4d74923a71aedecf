"""`python -m wan.integrate PATH/TO/Matrix-Game-2`: put OptimizedCausalWanModel and
OptimizedVAEDecoderWrapper into a Matrix-Game-2 checkout, and take them out again (`--undo`).

Both projects name their package `wan`, so this library cannot be imported beside upstream's. It is
installed *into* upstream's package instead, as new files, plus one changed line per upstream file:

* new: `wan/runtime/` (what the optimized models run on: caches, plan, graphs, input checks) and
  `wan/ops/` (the backends and kernels), `wan/modules/optimized_causal_model.py` (its
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
  tests/test_matrix_game_checkout.py;
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
else. `--status` lists the installed files and every changed line.
"""
import argparse
import difflib
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[2]
STATE_DIR = ".wan_integration"
MANIFEST = "manifest.json"
WRAPPER = "utils/wan_wrapper.py"
UPSTREAM_IMPORT = "from wan.modules.causal_model import CausalWanModel"
OPTIMIZED_IMPORT = ("from wan.modules.optimized_causal_model import OptimizedCausalWanModel as "
                    "CausalWanModel  # installed by wan.integrate (undo: python -m wan.integrate "
                    "--undo)")
DECODER_IMPORT = "from demo_utils.vae_block3 import VAEDecoderWrapper"
OPTIMIZED_DECODER_IMPORT = ("from wan.modules.optimized_vae_decoder import "
                            "OptimizedVAEDecoderWrapper as VAEDecoderWrapper  # installed by "
                            "wan.integrate (undo: python -m wan.integrate --undo)")
# installed only with the decoder lines; upstream has no file of these names
# this library's packages, copied whole (upstream's wan has neither name)
INSTALLED_PACKAGES = ("wan/runtime", "wan/ops")
DECODER_FILES = ("wan/modules/optimized_vae_decoder.py", "wan/modules/vae_decoder.py",
                 "wan/modules/checkpoint.py")
COMPILED_DECODER_CACHE = "compiled_vae_decoder.pt"  # where the fork's inference.py pickles one
SKIPPED_DIRS = {STATE_DIR, "__pycache__", ".git", ".pytest_cache"}
# what a Matrix-Game-2 tree must hold for this command to touch it
RECOGNISED_BY = {
    "wan/modules/causal_model.py": "class CausalWanModel",
    "pipeline/causal_inference.py": "class CausalInferencePipeline",
    WRAPPER: "class WanDiffusionWrapper",
}
# files the suite rewrites when it runs: saved so that --undo brings them back
REWRITTEN_BY_THE_SUITE = ("tests/baseline_performance.txt",)


class NotMatrixGame2(SystemExit):
    pass


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
            files[relative] = relative
    for name in ("test_causal_wan_model.py", "run_tests.sh", "README.md", "QUICK_START.md"):
        files[f"tests/{name}"] = f"tests/{name}"
    missing = [src for src in files.values() if not (SOURCE_ROOT / src).is_file()]
    if missing:
        raise SystemExit(f"wan.integrate needs a clone of the wan repository (its tests/ folder); "
                         f"missing here: {', '.join(missing)}")
    return files


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_tree(root: Path):
    """Refuse anything that is not a Matrix-Game-2 checkout, saying what is missing."""
    problems = []
    for relative, marker in RECOGNISED_BY.items():
        path = root / relative
        if not path.is_file():
            problems.append(f"{relative} is missing")
        elif marker not in path.read_text(errors="replace"):
            problems.append(f"{relative} does not define {marker.split()[-1]}")
    if problems:
        hint = ""
        if (root / "Matrix-Game-2").is_dir():
            hint = f"\n(did you mean {root / 'Matrix-Game-2'}?)"
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


def _patched_wrapper(text: str) -> str:
    return _swap_line(WRAPPER, text, UPSTREAM_IMPORT, OPTIMIZED_IMPORT)


def _python_files(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath, name).relative_to(root).as_posix()


def decoder_sites(root: Path, skip=()):
    """(files whose decoder import line is changed, files that name vae_block3's decoder another
    way and keep upstream's), over every Python file of the tree but `skip`."""
    sites, others = [], []
    for relative in _python_files(root):
        if relative in skip or relative == "demo_utils/vae_block3.py":
            continue
        text = (root / relative).read_text(errors="replace")
        if any(line.strip() == DECODER_IMPORT for line in text.splitlines()):
            sites.append(relative)
        elif "vae_block3" in text and "VAEDecoderWrapper" in text:
            others.append(relative)
    return sites, others


def _is_marker(path: Path) -> bool:
    """A compiled_vae_decoder.pt that the optimized decoder wrote (a marker, no module)."""
    from ..modules.optimized_vae_decoder import PICKLE_FORMAT
    return path.stat().st_size < 65536 and PICKLE_FORMAT.encode() in path.read_bytes()


def _compiled_caches(root: Path) -> list:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        if COMPILED_DECODER_CACHE in filenames:
            found.append(Path(dirpath, COMPILED_DECODER_CACHE).relative_to(root).as_posix())
    return found


def _load_manifest(root: Path):
    path = root / STATE_DIR / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _patched_lines(manifest) -> dict:
    """{upstream file: its new line} of what is installed (manifests older than the decoder lines
    recorded only the wrapper)."""
    if "patched" in manifest:
        return manifest["patched"]
    return {WRAPPER: OPTIMIZED_IMPORT} if WRAPPER in manifest["installed"] else {}


def install(root: Path, out=print) -> list:
    """Install (or update) into `root`; returns the list of paths it wrote."""
    check_tree(root)
    manifest = _load_manifest(root) or {"installed": {}, "saved": [], "created_dirs": [],
                                        "suite_outputs": []}
    manifest["patched"] = patched = dict(_patched_lines(manifest))
    manifest.setdefault("moved", [])
    state = root / STATE_DIR
    originals = state / "originals"
    for package in INSTALLED_PACKAGES if not manifest["installed"] else ():
        if (root / package).exists():
            raise SystemExit(f"{root / package} exists and was not installed by wan.integrate; "
                             f"not overwriting it")

    # every check before anything is written: a refusal leaves the tree untouched
    sites, others = decoder_sites(root, skip=set(manifest["installed"]) - set(patched))
    new_sites = [relative for relative in sites if relative not in patched]
    decoder = bool(sites) or any(line == OPTIMIZED_DECODER_IMPORT for line in patched.values())
    for relative in DECODER_FILES if decoder else ():
        if (root / relative).exists() and relative not in manifest["installed"]:
            raise SystemExit(f"{relative} exists and was not installed by wan.integrate (this "
                             f"command installs the optimized decoder under that name); not "
                             f"overwriting it")
    wanted = {dest: (SOURCE_ROOT / src).read_bytes()
              for dest, src in installed_files(decoder).items()}
    before = {}
    for relative, (old, new) in [*([(WRAPPER, (UPSTREAM_IMPORT, OPTIMIZED_IMPORT))]
                                   if WRAPPER not in patched else []),
                                 *[(site, (DECODER_IMPORT, OPTIMIZED_DECODER_IMPORT))
                                   for site in new_sites]]:
        before[relative] = (root / relative).read_bytes().decode()  # line ends as they are
        wanted[relative] = _swap_line(relative, before[relative], old, new).encode()
        patched[relative] = new
    for relative in patched:
        if relative not in wanted:  # already changed: keep the changed text
            wanted[relative] = (root / relative).read_bytes()

    written = []
    for relative, data in wanted.items():
        path = root / relative
        recorded = manifest["installed"].get(relative)
        if path.exists() and recorded and _sha(path.read_bytes()) != recorded:
            raise SystemExit(f"{relative} changed since wan.integrate installed it; undo your "
                             f"edits or run --undo first")
        if path.exists() and recorded is None:  # an upstream file: save it before replacing
            (originals / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, originals / relative)
            manifest["saved"].append(relative)
        if path.exists() and path.read_bytes() == data:
            manifest["installed"][relative] = _sha(data)
            continue
        for parent in reversed(path.relative_to(root).parents[:-1]):
            if not (root / parent).exists():
                manifest["created_dirs"].append(parent.as_posix())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if relative.endswith(".sh"):
            path.chmod(0o755)
        manifest["installed"][relative] = _sha(data)
        written.append(relative)
        if relative in before:
            out("".join(difflib.unified_diff(before[relative].splitlines(True),
                                             data.decode().splitlines(True),
                                             f"a/{relative}", f"b/{relative}")))

    for relative in REWRITTEN_BY_THE_SUITE:
        path = root / relative
        if relative in manifest["saved"] or relative in manifest["suite_outputs"]:
            continue
        if path.is_file():
            (originals / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, originals / relative)
            manifest["saved"].append(relative)
        else:  # the suite will create it: undo deletes it
            manifest["suite_outputs"].append(relative)
    moved = []
    if decoder:  # upstream's pickled compiled decoder would be loaded in place of ours
        for relative in _compiled_caches(root):
            if not _is_marker(root / relative):
                (state / "moved" / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(root / relative, state / "moved" / relative)
                manifest["moved"].append(relative)
                moved.append(relative)
    state.mkdir(exist_ok=True)
    (state / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    if written or moved:
        out(f"wan.integrate: wrote {len(written)} file(s) into {root}:")
        for relative in written:
            out(f"  {'changed' if relative in manifest['saved'] else 'added  '} {relative}")
        for relative in moved:
            out(f"  moved   {relative} (upstream's pickled compiled decoder, which its "
                f"inference.py would load in place of the optimized one) to "
                f"{STATE_DIR}/moved/; --undo puts it back")
        out(f"  (saved originals: {', '.join(manifest['saved']) or 'none'}; "
            f"undo: python -m wan.integrate --undo {root})")
    else:
        out(f"wan.integrate: {root} is up to date, nothing changed")
    if not decoder:
        out(f"wan.integrate: no file of {root} has the line `{DECODER_IMPORT}`: installed the "
            f"DiT only; the scripts keep upstream's decoder (build "
            f"wan.modules.optimized_vae_decoder.OptimizedVAEDecoderWrapper yourself to use ours)")
    if others:
        out(f"wan.integrate: these files name upstream's decoder another way and keep it: "
            f"{', '.join(others)}")
    return written


def undo(root: Path, out=print) -> list:
    """Remove what `install` wrote and restore what it saved; returns the paths touched."""
    manifest = _load_manifest(root)
    if manifest is None:
        raise SystemExit(f"{root}: wan.integrate has not installed anything here (no "
                         f"{STATE_DIR}/{MANIFEST})")
    changed = [rel for rel, sha in manifest["installed"].items()
               if (root / rel).is_file() and _sha((root / rel).read_bytes()) != sha
               and rel not in REWRITTEN_BY_THE_SUITE]
    if changed:
        raise SystemExit(f"these installed files were edited since: {', '.join(changed)}; restore "
                         f"or delete them first (undo would lose the edits)")
    moved = manifest.get("moved", [])
    # markers the optimized decoder's torch.save wrote (upstream's decoder cannot read them)
    markers = [rel for rel in _compiled_caches(root) if _is_marker(root / rel)]
    in_the_way = [rel for rel in moved if (root / rel).exists() and rel not in markers]
    if in_the_way:
        raise SystemExit(f"{', '.join(in_the_way)} would be overwritten by the file moved away "
                         f"at install ({STATE_DIR}/moved/); move one of them first")
    removed = []
    for relative in [*manifest["installed"], *manifest["suite_outputs"], *markers]:
        if (root / relative).is_file():
            (root / relative).unlink()
            removed.append(relative)
    for relative in manifest["saved"]:
        shutil.copy2(root / STATE_DIR / "originals" / relative, root / relative)
    for relative in moved:
        shutil.move(root / STATE_DIR / "moved" / relative, root / relative)
    for relative in sorted(manifest["created_dirs"], key=lambda p: -p.count("/")):
        folder = root / relative
        if (folder / "__pycache__").is_dir():  # only in folders this command created
            shutil.rmtree(folder / "__pycache__")
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    shutil.rmtree(root / STATE_DIR)
    restored = manifest["saved"]
    out(f"wan.integrate: undone in {root}: restored {len(restored)} file(s) "
        f"({', '.join(restored) or 'none'}), removed "
        f"{len([r for r in removed if r not in restored])}"
        + (f", put back {', '.join(moved)}" if moved else "")
        + (f", deleted the optimized decoder's marker(s) {', '.join(markers)}" if markers else ""))
    return removed + restored + moved


def status(root: Path, out=print):
    manifest = _load_manifest(root)
    if manifest is None:
        check_tree(root)
        sites, _ = decoder_sites(root)
        out(f"{root}: a Matrix-Game-2 checkout; wan.integrate has not installed anything here "
            f"(it would change {WRAPPER}" + "".join(f", {s}" for s in sites) + ")")
        return
    patched = _patched_lines(manifest)
    decoder = any(line == OPTIMIZED_DECODER_IMPORT for line in patched.values())
    out(f"{root}: installed by wan.integrate ({len(manifest['installed'])} files; the DiT"
        f"{' and the decoder' if decoder else ' only, upstream decoder kept'}; saved originals: "
        f"{', '.join(manifest['saved']) or 'none'})")
    for relative, line in sorted(patched.items()):
        text = (root / relative).read_text().splitlines()
        number = next((i + 1 for i, got in enumerate(text) if got.strip() == line), None)
        where = f"line {number}" if number else "LINE MISSING (edited since?)"
        out(f"  changed {relative}, {where}: {line}")
    for relative in manifest.get("moved", []):
        out(f"  moved   {relative} -> {STATE_DIR}/moved/{relative}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m wan.integrate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("checkout", type=Path, help="the Matrix-Game-2 folder (holding wan/, pipeline/, "
                                               "utils/, configs/)")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--undo", action="store_true", help="restore the checkout as it was")
    action.add_argument("--status", action="store_true",
                        help="say what is installed, change nothing")
    args = p.parse_args(argv)
    root = args.checkout.resolve()
    if not root.is_dir():
        p.error(f"{root} is not a folder")
    try:
        if args.undo:
            undo(root)
        elif args.status:
            status(root)
        else:
            install(root)
    except SystemExit as err:  # our refusals: a message and exit status 2
        if isinstance(err.code, str):
            print(f"wan.integrate: {err.code}", file=sys.stderr)
            raise SystemExit(2)
        raise


if __name__ == "__main__":
    main()
