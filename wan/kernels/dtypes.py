"""The dtype names the command line tools (and benchmarks) accept: one table for all of them."""
import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "fp64": torch.float64, "float32": torch.float32, "float64": torch.float64}


def default_dtype_name(device) -> str:
    """bf16 on a GPU, fp32 elsewhere (the tools' default)."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"
