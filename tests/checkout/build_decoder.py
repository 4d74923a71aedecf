"""Upstream's own model-building code (`InteractiveGameInference._init_models` of `inference.py`
and `inference_streaming.py`) run in an integrated Matrix-Game-2 checkout on a CPU: which decoder
class comes out, whether anything calls torch.compile, and what is unpickled.

Run it with the integrated Matrix-Game-2 folder as the working directory:

    cd PATH/TO/Matrix-Game-2 && python /path/to/wan/tests/checkout/build_decoder.py --out r.json

What it stands in for, and only that: the weights (a random `Wan2.1_VAE.pth` in a temporary
`--pretrained_model_path`, written with torch.save of a plain state dict; a 2-layer DiT config),
the Wan VAE encoder + CLIP (`get_wanx_vae_wrapper`, whose weights are not here) and the device
(`self.device`, which upstream fixes to CUDA, is the CPU). `torch.compile` raises if called;
every `torch.load` call is recorded with the globals its file's pickle names (read with pickletools
before loading: nothing is unpickled to find out). inference.py runs once per --vae_compile_mode
(auto twice: the first run writes the cache file, the second finds it).
"""
import argparse
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, os.getcwd())                      # the checkout's packages
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the stand-ins
import standins  # noqa: E402
from pickle_names import pickle_globals  # noqa: E402

standins.install()

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

SMALL = {"num_layers": 2, "ffn_dim": 256}


class Recorder:
    def __init__(self):
        self.compile_calls, self.loads = 0, []
        self._load = torch.load

    def install(self):
        def no_compile(*args, **kwargs):
            self.compile_calls += 1
            raise RuntimeError("torch.compile was called")

        def recording_load(f, *args, **kwargs):
            entry = {"file": os.path.basename(str(f)),
                     "weights_only": kwargs.get("weights_only")}
            if kwargs.get("weights_only") is False:
                entry["pickle_globals"] = pickle_globals(f)
            self.loads.append(entry)
            return self._load(f, *args, **kwargs)

        torch.compile = no_compile
        torch.load = recording_load


def small_setup(workdir: Path):
    """A config YAML naming a 2-layer model config, and a folder with a random Wan2.1_VAE.pth."""
    config = json.loads(Path("configs/distilled_model/universal/config.json").read_text())
    config.update(SMALL)
    config["action_config"]["blocks"] = list(range(SMALL["num_layers"]))
    (workdir / "model").mkdir()
    (workdir / "model" / "config.json").write_text(json.dumps(config))
    yaml = OmegaConf.load("configs/inference_yaml/inference_universal.yaml")
    yaml.model_kwargs.model_config = str(workdir / "model")
    OmegaConf.save(yaml, workdir / "inference.yaml")
    from demo_utils.vae_block3 import VAEDecoderWrapper as UpstreamDecoder
    from wan.modules.random_init import randomize_decoder_weights_
    weights = randomize_decoder_weights_(UpstreamDecoder()).state_dict()
    weights["encoder.conv1.weight"] = torch.zeros(1)  # what the cut in the scripts drops
    (workdir / "pretrained").mkdir()
    torch.save(weights, workdir / "pretrained" / "Wan2.1_VAE.pth")
    return str(workdir / "inference.yaml"), str(workdir / "pretrained")


def build(script: str, config_path: str, pretrained: str, compile_mode=None):
    """Run `script`'s InteractiveGameInference._init_models on the CPU; returns the pipeline."""
    module = importlib.import_module(script)
    module.get_wanx_vae_wrapper = lambda path, dtype: torch.nn.Linear(1, 1)  # no weights here
    app = module.InteractiveGameInference.__new__(module.InteractiveGameInference)
    app.args = SimpleNamespace(config_path=config_path, pretrained_model_path=pretrained,
                               checkpoint_path="", vae_compile_mode=compile_mode,
                               enable_profile=False)
    app.enable_profile = False
    app.device = torch.device("cpu")
    app.weight_dtype = torch.bfloat16
    app._init_config()
    app._init_models()
    return app.pipeline


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    recorder = Recorder()
    config_path, pretrained = small_setup(Path(tempfile.mkdtemp()))
    recorder.install()
    report = {"runs": []}
    cache = Path(pretrained) / "compiled_vae_decoder.pt"
    for script, mode in (("inference_streaming", None), ("inference", "none"),
                         ("inference", "auto"), ("inference", "auto"), ("inference", "force")):
        loads_before = len(recorder.loads)
        existed = cache.exists()
        pipeline = build(script, config_path, pretrained, mode)
        decoder = pipeline.vae_decoder
        from wan.modules import optimized_vae_decoder
        last = optimized_vae_decoder._last_built()
        report["runs"].append({
            "script": script, "vae_compile_mode": mode, "cache_existed": existed,
            "decoder_class": type(decoder).__name__,
            "decoder_module": type(decoder).__module__,
            "generator_class": type(pipeline.generator.model).__name__,
            "decoder_is_the_one_built": decoder is last,
            "compiled_call_impl": decoder._compiled_call_impl is not None,
            "decoder_cuda_graphs": decoder.cuda_graphs,
            "decoder_dtype": str(next(decoder.parameters()).dtype),
            "cache_bytes": cache.stat().st_size if cache.exists() else None,
            "loads": recorder.loads[loads_before:]})
    report["torch_compile_calls"] = recorder.compile_calls
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
