"""The command line tools on bad input: each row exits with status 2 and exactly one line on
stderr (`prog: error: ...`, blank lines aside) holding the expected fragment, and fails before
any work (no output file appears; the in-process rows also replace the tool's model building with
a function that fails the test when called). A few rows per tool run as subprocesses, as a user
types them; the rest call the tool's `main(argv)` in this process (a Python start with torch
costs seconds here).

Tools: python -m wan.serve, wan.compare, wan.integrate, wan.kernels, wan.play, wan.play.client
(wan/tools/, one shape: `main(argv=None)` over wan/tools/cli.py), and the benchmarks the README's
main command runs (benchmarks/stream.py, benchmarks/end_to_end.py). Each command's --help works
as `python -m` and through its pyproject.toml [project.scripts] entry, and every argument of every
one of them has a help text."""
import importlib
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
MISSING_DIR = "/nonexistent-wan-cli-test"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad (and one good) input files: truncated, empty, mismatched, not JSON, bad YAML."""
    d = tmp_path_factory.mktemp("cli")
    good = d / "good.safetensors"
    save_file({"weight": torch.zeros(64, 64)}, str(good))  # valid, but no model's keys
    data = good.read_bytes()
    (d / "truncated.safetensors").write_bytes(data[:len(data) // 2])
    (d / "garbage.safetensors").write_bytes(b"\xff" * 64)
    torch.save({"decoder.conv1.weight": torch.zeros(8, 8)}, d / "vae.pth")
    pth = (d / "vae.pth").read_bytes()
    (d / "truncated.pth").write_bytes(pth[:len(pth) // 2])
    (d / "empty.pth").write_bytes(b"")
    (d / "weights.bin").write_bytes(b"0123")
    (d / "not_json.json").write_text("{dim: 3")
    (d / "list.json").write_text("[1, 2]")
    (d / "unknown_keys.json").write_text(json.dumps({"dim": 64, "no_such_key": 1}))
    (d / "bad.yaml").write_text("default: [eager\n")
    (d / "list.yaml").write_text("- eager\n")
    (d / "no_shards").mkdir()
    (d / "out").mkdir()
    return d


def _one_line(code, stderr, fragment, prog):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, (code, stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert fragment in lines[0], (fragment, lines[0])


# ------------------------------------------------------------------ as a user types them
SUBPROCESS_ROWS = [  # (command after python, fragment, an output path that must not appear)
    (["-m", "wan.serve", "--out", f"{MISSING_DIR}/x.json"], "does not exist (create it first)",
     None),
    (["-m", "wan.serve", "--players", "1000000"], "needs about", None),
    (["-m", "wan.serve", "--checkpoint", "{d}/truncated.safetensors", "--out", "{d}/out/s.json"],
     "truncated: its header places tensors up to byte", "{d}/out/s.json"),
    (["-m", "wan.serve", "--vae", "{d}/good.safetensors", "--out", "{d}/out/v.json"],
     "does not match OptimizedVAEDecoderWrapper", "{d}/out/v.json"),  # after the build: fast
    (["-m", "wan.serve", "--warmup", "-1"], "argument --warmup: must be at least 0", None),
    (["-m", "wan.serve", "--precision", "fp8", "--blocks", "1", "--out", "{d}/out/f.json"],
     "--precision fp8 cannot run here: FP8 GEMMs need an NVIDIA GPU", "{d}/out/f.json"),
    (["-m", "wan.compare", "--preset", "tiny", "--device", "cpu", "--precision", "fp8",
      "--out", "{d}/out/c.json"], "add --emulate-fp8", "{d}/out/c.json"),
    (["-m", "wan.compare", "--config", "{d}/not_json.json"], "not valid JSON", None),
    (["-m", "wan.kernels", "--backend", "bogus"], "unknown backend 'bogus'", None),
    (["-m", "wan.kernels", "--device", "bogus"], "unknown device 'bogus'", None),
    (["-m", "wan.play", "--device", "cpu", "--vae", "{d}/missing.pth"], "no such file", None),
    (["benchmarks/stream.py", "--blocks", "1000000000", "--out", "{d}/out/b.json"],
     "needs about", "{d}/out/b.json"),
    (["benchmarks/end_to_end.py", "--out", f"{MISSING_DIR}/e.json"], "does not exist", None),
]
PROGS = {"wan.serve": "python -m wan.serve", "wan.compare": "python -m wan.compare",
         "wan.kernels": "python -m wan.kernels", "wan.play": "python -m wan.play",
         "benchmarks/stream.py": "benchmarks/stream.py",
         "benchmarks/end_to_end.py": "benchmarks/end_to_end.py"}


@pytest.mark.parametrize("command,fragment,out", SUBPROCESS_ROWS,
                         ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_bad_command_line_is_one_line_and_exit_2(files, command, fragment, out):
    command = [part.format(d=files) for part in command]
    result = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    tool = command[1] if command[0] == "-m" else command[0]
    _one_line(result.returncode, result.stderr, fragment, PROGS[tool])
    if out is not None:
        assert not Path(out.format(d=files)).exists()


# ------------------------------------------------------------------ in this process
def _no_work(monkeypatch):
    """Every tool's model building fails the test: a row must be refused before it."""
    import benchmarks.end_to_end as end_to_end
    import benchmarks.stream as stream
    import wan.tools.compare as compare
    import wan.tools.play as play
    import wan.tools.serve as serve

    def work(*args, **kwargs):
        raise AssertionError("the tool started its work before refusing the input")

    class NoModel:
        from_config = staticmethod(work)

    monkeypatch.setattr(serve, "build", work)
    monkeypatch.setattr(compare, "CausalWanModel", NoModel)
    monkeypatch.setattr(play, "GameEngine", work)
    monkeypatch.setattr(stream, "build_models", work)
    monkeypatch.setattr(end_to_end, "build", work)


MODULE_OF = {"serve": "wan.tools.serve", "compare": "wan.tools.compare",
             "integrate": "wan.tools.integrate", "kernels": "wan.tools.kernels",
             "play": "wan.tools.play", "play_client": "wan.tools.play_client",
             "stream": "benchmarks.stream", "end_to_end": "benchmarks.end_to_end"}


def _main(tool):
    return importlib.import_module(MODULE_OF[tool]).main


PROG_OF = {"serve": "python -m wan.serve", "compare": "python -m wan.compare",
           "integrate": "wan.integrate", "play": "python -m wan.play",
           "kernels": "python -m wan.kernels", "play_client": "python -m wan.play.client",
           "stream": "benchmarks/stream.py", "end_to_end": "benchmarks/end_to_end.py"}

IN_PROCESS_ROWS = [  # (tool, argv, fragment)
    ("serve", ["--players", "0"], "argument --players: must be at least 1, got 0"),
    ("serve", ["--blocks", "0"], "argument --blocks: must be at least 1"),
    ("serve", ["--blocks", "x"], "expected an integer, got 'x'"),
    ("serve", ["--blocks", "1000000000"], "needs about"),
    ("serve", ["--frames-out", f"{MISSING_DIR}/f.pt"], "--frames-out"),
    ("serve", ["--out", "{d}/out"], "is a folder"),
    ("serve", ["--checkpoint", "{d}/missing.safetensors"], "no such file"),
    ("serve", ["--checkpoint", "{d}/garbage.safetensors"], "not a safetensors file"),
    ("serve", ["--checkpoint", "{d}/no_shards"], "no .safetensors files in this folder"),
    ("serve", ["--vae", "{d}/truncated.pth"], "an incomplete PyTorch checkpoint"),
    ("serve", ["--vae", "{d}/empty.pth"], "the file is empty"),
    ("serve", ["--vae", "{d}/weights.bin"], "expected a .pth or .safetensors file"),
    ("compare", ["--blocks", "0"], "must be at least 1"),
    ("compare", ["--device", "bogus"], "unknown device 'bogus'"),
    ("compare", ["--device", "cuda:7"] if torch.cuda.device_count() < 8 else ["--device", "x"],
     "device"),
    ("compare", ["--precision", "int4"], "invalid choice: 'int4'"),
    ("compare", ["--config", "{d}/missing.json"], "no such file"),
    ("compare", ["--config", "{d}/list.json"], "holds a JSON list"),
    ("compare", ["--config", "{d}/unknown_keys.json"], "unknown config keys"),
    ("compare", ["--preset", "tiny", "--device", "cpu", "--blocks", "100000000"], "needs about"),
    ("compare", ["--preset", "tiny", "--device", "cpu", "--out", f"{MISSING_DIR}/c.json"],
     "does not exist"),
    ("compare", ["--preset", "tiny", "--checkpoint", "{d}/truncated.safetensors"], "truncated"),
    ("play", ["--port", "70000"], "a port is at most 65535"),
    ("play", ["--jpeg-quality", "0"], "--jpeg-quality: must be at least 1"),
    ("play", ["--log-level", "loud"], "invalid choice: 'LOUD'"),
    ("play", ["--device", "cpu", "--max-players", "0"], "must be at least 1"),
    ("play", ["--device", "cpu", "--idle-timeout", "0"], "must be a positive number"),
    ("play", ["--device", "cpu", "--linger", "-1"], "must be a number >= 0"),
    ("play", ["--device", "cpu", "--matrix-game-dir", "{d}/missing"], "no such folder"),
    ("play", ["--device", "cpu", "--max-players", "1000000"], "needs about"),
    ("integrate", ["--force", "{d}"], "--force goes with --undo only"),
    ("integrate", ["{d}/missing"], "does not exist"),
    ("play_client", [], "the following arguments are required: --url"),
    ("play_client", ["--url", "ws://127.0.0.1:9/ws", "--clients", "0"], "must be at least 1"),
    ("play_client", ["--url", "ws://127.0.0.1:9/ws", "--warmup", "5", "--seconds", "5"],
     "--warmup 5 must be less than --seconds 5"),
    ("play_client", ["--url", "ws://127.0.0.1:9/ws", "--out", f"{MISSING_DIR}/c.json"],
     "does not exist"),
    ("kernels", ["--backend", "{d}/missing.yaml"], "no such file"),
    ("kernels", ["--backend", "{d}/bad.yaml"], "not readable YAML"),
    ("kernels", ["--backend", "{d}/list.yaml"], "must be a mapping with"),
    ("stream", ["--models", "reference,nope"], "unknown model(s) ['nope']"),
    ("stream", ["--denoising-steps", "1000,0"], "timesteps lie in (0, 1000]"),
    ("stream", ["--blocks", "2"], "never reaches steady state"),
    ("end_to_end", ["--pairs", "bogus"], "unknown pair(s) ['bogus']"),
    ("end_to_end", ["--warmup", "-1"], "must be at least 0"),
    ("end_to_end", ["--blocks", "2", "--warmup", "2"], "must exceed --warmup"),
]


@pytest.mark.parametrize("tool,argv,fragment", IN_PROCESS_ROWS,
                         ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_arguments_are_refused_before_any_work(files, monkeypatch, capsys, tool, argv,
                                                   fragment):
    _no_work(monkeypatch)
    monkeypatch.delenv("WAN_BACKEND", raising=False)
    argv = [part.format(d=files) for part in argv]
    with pytest.raises(SystemExit) as exit:
        _main(tool)(argv)
    _one_line(exit.value.code, capsys.readouterr().err, fragment, PROG_OF[tool])
    assert sorted(p.name for p in (files / "out").iterdir()) == []


def test_a_port_in_use_is_refused_before_the_model_is_built(monkeypatch, capsys):
    _no_work(monkeypatch)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit:
            _main("play")(["--device", "cpu", "--port", str(port)])
    _one_line(exit.value.code, capsys.readouterr().err, f"cannot listen on 127.0.0.1:{port}",
              "python -m wan.play")


def test_the_helper_keeps_tracebacks_for_bugs_and_on_request(monkeypatch, capsys):
    """A bug (here a KeyError) is not a user error: it keeps its traceback; WAN_TRACEBACK=1 shows
    the traceback of a user error too; multi-line messages become one line."""
    from wan.tools import cli

    def bug(argv):
        raise KeyError("internal")

    with pytest.raises(KeyError):
        cli.run("tool", bug, [])

    def mismatch(argv):
        raise ValueError("checkpoint x does not match M:\n2 missing key(s):\n    a\n    b\n"
                         "1 unexpected key(s):\n    c")

    with pytest.raises(SystemExit):
        cli.run("tool", mismatch, [])
    assert capsys.readouterr().err == ("tool: error: checkpoint x does not match M: 2 missing "
                                       "key(s): a, b; 1 unexpected key(s): c\n")
    monkeypatch.setenv("WAN_TRACEBACK", "1")
    with pytest.raises(ValueError):
        cli.run("tool", mismatch, [])


def test_nan_in_a_served_block_is_one_line_and_exit_1(monkeypatch, capsys, tmp_path):
    """wan.serve on weights that give NaN: the player and block are named, exit status 1 (the
    run failed; the command line was right), and no report is written."""
    import wan.tools.serve as serve
    original = serve.build

    def nan_weights(args, device):
        model, decoder, latent_hw = original(args, device)
        with torch.no_grad():
            model.head.head.weight.fill_(float("nan"))
        return model, decoder, latent_hw

    monkeypatch.setattr(serve, "build", nan_weights)
    out = tmp_path / "report.json"
    with pytest.raises(SystemExit) as exit:
        serve.main(["--players", "1", "--blocks", "1", "--out", str(out)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit.value.code == 1
    assert lines[-1].startswith("python -m wan.serve: failed: player 0: block 0 (latent frames "
                                "0-2): the DiT's denoised latents hold"), lines
    assert not out.exists()


# ------------------------------------------------------------------ one shape, help texts
def _scripts():
    """pyproject.toml's [project.scripts]: {script name: (module, function)}."""
    text = (ROOT / "pyproject.toml").read_text()
    table = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return {name: tuple(target.split(":")) for name, target in
            re.findall(r'^([\w-]+)\s*=\s*"([\w.:]+)"', table, flags=re.M)}


COMMANDS = {  # python -m name: (script, the tool's module)
    "wan.serve": ("wan-serve", "wan.tools.serve"),
    "wan.compare": ("wan-compare", "wan.tools.compare"),
    "wan.integrate": ("wan-integrate", "wan.tools.integrate"),
    "wan.kernels": ("wan-kernels", "wan.tools.kernels"),
    "wan.play": ("wan-play", "wan.tools.play"),
    "wan.play.client": ("wan-play-client", "wan.tools.play_client"),
}


def test_every_command_has_a_script_entry_on_its_main():
    assert _scripts() == {script: (module, "main") for script, module in COMMANDS.values()}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_as_python_m(command):
    result = subprocess.run([sys.executable, "-m", command, "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m {command} "), result.stdout[:200]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_through_the_script_entry(command, capsys):
    module, function = _scripts()[COMMANDS[command][0]]
    with pytest.raises(SystemExit) as exit:
        getattr(importlib.import_module(module), function)(["--help"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m {command} ")


class _Parsed(BaseException):
    """Raised instead of parsing: the parser a tool built (not an Exception: cli.run lets it
    through)."""


@pytest.mark.parametrize("tool", list(MODULE_OF))
def test_every_argument_has_a_help_text(tool, monkeypatch):
    from wan.tools import cli
    built = []

    def parse_known_args(parser, args=None, namespace=None):
        built.append(parser)
        raise _Parsed

    monkeypatch.setattr(cli.ArgumentParser, "parse_known_args", parse_known_args)
    with pytest.raises(_Parsed):
        _main(tool)([])
    missing = [action.option_strings or action.dest for action in built[0]._actions
               if not action.help]
    assert not missing, f"{PROG_OF[tool]}: no help text for {missing}"
