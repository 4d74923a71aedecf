"""Upstream's own CausalInferencePipeline, upstream vs fully integrated (DiT and decoder), on a GPU;
then the seed suite's benchmark in the integrated checkout, with no option set.

    MATRIX_GAME_DIR=PATH/TO/Matrix-Game-2 python benchmarks/upstream_pipeline_full.py [--out DIR]

Steps (each a subprocess, so every run has a process of its own):
1. copies the checkout (MATRIX_GAME_DIR is never changed) and runs `python -m wan.integrate` on
   the copy;
2. tests/checkout/run_pipeline.py in it: bf16, universal config, random weights, 10 blocks, two
   videos; upstream's run decodes with upstream's fp16 VAEDecoderWrapper, the integrated run with
   the OptimizedVAEDecoderWrapper its scripts now import (fp16, as the pipeline runs it), all
   options at their defaults (CUDA graphs on); a float32 run (upstream's model, exact attention,
   upstream's decoder in float32) is the reference for the latents' and the frames' error;
3. `./tests/run_tests.sh benchmark` in the copy (the seed's protocol, no option set; with
   tests/checkout/standins.py as a pytest plugin, for flash_attn, which the device lacks).

On the device machine (torch 2.11, no omegaconf/diffusers/easydict/ftfy there): carry the
checkout (e.g. `.mg2/Matrix-Game-2`) and wheels of omegaconf, diffusers, easydict, ftfy, wcwidth,
importlib_metadata and zipp, installed with `pip install --no-index --no-deps --target /tmp/site`
and PYTHONPATH=/tmp/site. The pipeline part and the suite part fit one 600 s call each
(`--skip-suite`, then `--suite-only`).
Writes DIR/upstream_pipeline_full.json (with the pipeline's full report) and the suite's log, and
prints a short table last. DIR defaults to $OUT, else benchmarks/results.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(command, cwd, log, timeout, env=None):
    begin = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env=env)
    log.write_text(f"# {' '.join(map(str, command))}  (cwd {cwd})\n{result.stdout}\n{result.stderr}")
    print(f"{' '.join(map(str, command))[:120]}: exit {result.returncode}, "
          f"{time.perf_counter() - begin:.0f} s", flush=True)
    if result.returncode != 0:
        print(result.stdout[-3000:], result.stderr[-3000:], sep="\n")
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"))
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--videos", type=int, default=2)
    p.add_argument("--skip-suite", action="store_true", help="leave out the seed suite's benchmark")
    p.add_argument("--suite-only", action="store_true", help="only the seed suite's benchmark")
    args = p.parse_args()
    source = os.environ.get("MATRIX_GAME_DIR")
    if not source:
        raise SystemExit("set MATRIX_GAME_DIR to a Matrix-Game-2 checkout")
    source = Path(source).resolve()
    if (source / "Matrix-Game-2").is_dir():
        source = source / "Matrix-Game-2"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkout = Path(tempfile.mkdtemp()) / "Matrix-Game-2"
    shutil.copytree(source, checkout, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.mp4",
                                                                    "*.pdf"))
    # this repository on the path for wan.integrate only; the checkout's own `wan` must win after
    # (other entries, e.g. carried wheels, stay)
    kept = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if entry and Path(entry).resolve() != ROOT]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *kept]))
    plain = dict(os.environ, PYTHONPATH=os.pathsep.join(kept))
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "command": " ".join(sys.argv), "checkout": str(source)}
    integrate = run([sys.executable, "-m", "wan.integrate", str(checkout)], ROOT,
                    out / "upstream_pipeline_full_integrate.log", 600, env)
    if integrate.returncode != 0:
        raise SystemExit("wan.integrate failed")
    pipeline_json = out / "upstream_pipeline_full_pipeline.json"
    pipeline = None
    if not args.suite_only:
        pipeline = run([sys.executable, str(ROOT / "tests" / "checkout" / "run_pipeline.py"),
                        "--device", "cuda", "--dtype", "bf16", "--config", "universal",
                        "--blocks", str(args.blocks), "--videos", str(args.videos),
                        "--decoder", "integrated", "--decoder-dtype", "fp16", "--oracle",
                        "--out", str(pipeline_json)], checkout,
                       out / "upstream_pipeline_full_pipeline.log", 3000, plain)
    if pipeline is not None and pipeline.returncode == 0:
        report["pipeline"] = json.loads(pipeline_json.read_text())
    suite = None
    if not args.skip_suite:
        # stand-ins for what the device lacks (flash_attn: SDPA), as tests/checkout/ runs the suite
        standins = str(ROOT / "tests" / "checkout")
        suite_env = dict(plain, PYTHONPATH=os.pathsep.join([standins, *kept]),
                         PYTEST_ADDOPTS="-p standins")
        suite = run(["./tests/run_tests.sh", "benchmark"], checkout,
                    out / "upstream_pipeline_full_seed_suite.log", 1800, suite_env)
        text = suite.stdout + suite.stderr
        report["seed_suite"] = {"exit": suite.returncode,
                                "lines": [line for line in text.splitlines()
                                          if re.search(r"(?i)mean|median|speedup|ms\b", line)][-40:]}
    name = "upstream_pipeline_full_suite.json" if args.suite_only else "upstream_pipeline_full.json"
    (out / name).write_text(json.dumps(report, indent=1))

    print("\nupstream's CausalInferencePipeline, bf16, universal, random weights, "
          f"{args.blocks} blocks x {args.videos} videos")
    if "pipeline" in report:
        r = report["pipeline"]
        print(f"{'run':<34}{'ms / 12-frame block':>20}{'latents err':>13}{'frames err':>12}")
        for name, label in (("upstream", "upstream (DiT + fp16 decoder)"),
                            ("optimized", "integrated DiT + decoder")):
            lat = max(r.get(f"{name}_vs_oracle_rel_err", [float("nan")]))
            frames = max(r.get(f"frames_{name}_vs_oracle_rel_err", [float("nan")]))
            print(f"{label:<34}{r[name]['block_ms_median']:>20.1f}{lat:>13.4f}{frames:>12.4f}"
                  f"   graphs DiT {r[name]['cuda_graphs']}, decoder "
                  f"{r[name].get('decoder_cuda_graphs')} ({r[name].get('decoder_class')})")
        if r.get("speedup"):
            print(f"speedup {r['speedup']:.2f}x")
    if suite is not None:
        print("seed suite benchmark (no option set):")
        for line in report["seed_suite"]["lines"][-8:]:
            print("  " + line.strip())


if __name__ == "__main__":
    main()
