"""`python -m wan.integrate PATH/TO/Matrix-Game-2`: put OptimizedCausalWanModel into a Matrix-Game-2
checkout, and take it out again (`--undo`).

Both projects name their package `wan`, so this library cannot be imported beside upstream's. It is
installed *into* upstream's package instead, as new files, plus one changed line:

* new: `wan/kernels/` (the backends and kernels), `wan/modules/optimized_causal_model.py` (its
  parent is then the checkout's own CausalWanModel), `wan/random_init.py` (random weights for the
  test suite), and the seed's test suite: `tests/test_causal_wan_model.py`, `tests/run_tests.sh`,
  `tests/README.md`, `tests/QUICK_START.md`;
* changed: `utils/wan_wrapper.py`, whose import of `CausalWanModel` becomes the optimized class
  (so `inference.py`, `inference_streaming.py` and every pipeline built by WanDiffusionWrapper run
  it).

Files that already exist there (the zoheth fork has a template `optimized_causal_model.py` and its
own suite) are saved under `.wan_integration/originals/` first, together with
`tests/baseline_performance.txt`, which the suite rewrites. `--undo` restores every saved file and
removes every installed one: the tree is then byte for byte what it was (the caches Python and
pytest write aside). Running the command again updates the installed files and changes nothing else.
"""
import argparse
import difflib
import hashlib
import json
import shutil
import sys
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = ".wan_integration"
MANIFEST = "manifest.json"
WRAPPER = "utils/wan_wrapper.py"
UPSTREAM_IMPORT = "from wan.modules.causal_model import CausalWanModel"
OPTIMIZED_IMPORT = ("from wan.modules.optimized_causal_model import OptimizedCausalWanModel as "
                    "CausalWanModel  # installed by wan.integrate (undo: python -m wan.integrate "
                    "--undo)")
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


def installed_files() -> dict:
    """{path in the checkout: path in this repository} of every file the command installs."""
    files = {"wan/modules/optimized_causal_model.py": "wan/modules/optimized_causal_model.py",
             "wan/random_init.py": "wan/random_init.py"}
    for source in sorted((SOURCE_ROOT / "wan" / "kernels").rglob("*.py")):
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


def _patched_wrapper(text: str) -> str:
    lines = text.splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if line.strip() == UPSTREAM_IMPORT]
    if len(hits) != 1:
        raise NotMatrixGame2(f"{WRAPPER}: expected the line `{UPSTREAM_IMPORT}` exactly once, "
                             f"found it {len(hits)} times; not changing a file this command does "
                             f"not recognise")
    line = lines[hits[0]]
    lines[hits[0]] = line[:len(line) - len(line.lstrip())] + OPTIMIZED_IMPORT + "\n"
    return "".join(lines)


def _load_manifest(root: Path):
    path = root / STATE_DIR / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def install(root: Path, out=print) -> list:
    """Install (or update) into `root`; returns the list of paths it wrote."""
    check_tree(root)
    manifest = _load_manifest(root) or {"installed": {}, "saved": [], "created_dirs": [],
                                        "suite_outputs": []}
    state = root / STATE_DIR
    originals = state / "originals"
    if not manifest["installed"] and (root / "wan" / "kernels").exists():
        raise SystemExit(f"{root / 'wan/kernels'} exists and was not installed by wan.integrate; "
                         f"not overwriting it")

    wanted = {dest: (SOURCE_ROOT / src).read_bytes() for dest, src in installed_files().items()}
    wrapper_path = root / WRAPPER
    wrapper_text = wrapper_path.read_text()
    if WRAPPER not in manifest["installed"]:
        wanted[WRAPPER] = _patched_wrapper(wrapper_text).encode()
    else:  # already patched: keep the patched text
        wanted[WRAPPER] = wrapper_path.read_bytes()

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
        if relative == WRAPPER:
            out("".join(difflib.unified_diff(wrapper_text.splitlines(True),
                                             data.decode().splitlines(True),
                                             f"a/{WRAPPER}", f"b/{WRAPPER}")))

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
    state.mkdir(exist_ok=True)
    (state / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    if written:
        out(f"wan.integrate: wrote {len(written)} file(s) into {root}:")
        for relative in written:
            out(f"  {'changed' if relative in manifest['saved'] else 'added  '} {relative}")
        out(f"  (saved originals: {', '.join(manifest['saved']) or 'none'}; "
            f"undo: python -m wan.integrate --undo {root})")
    else:
        out(f"wan.integrate: {root} is up to date, nothing changed")
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
    removed = []
    for relative in [*manifest["installed"], *manifest["suite_outputs"]]:
        if (root / relative).is_file():
            (root / relative).unlink()
            removed.append(relative)
    for relative in manifest["saved"]:
        shutil.copy2(root / STATE_DIR / "originals" / relative, root / relative)
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
        f"{len([r for r in removed if r not in restored])}")
    return removed + restored


def status(root: Path, out=print):
    manifest = _load_manifest(root)
    if manifest is None:
        check_tree(root)
        out(f"{root}: a Matrix-Game-2 checkout; wan.integrate has not installed anything here")
        return
    out(f"{root}: installed by wan.integrate ({len(manifest['installed'])} files; saved "
        f"originals: {', '.join(manifest['saved']) or 'none'})")


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
