import torch
from wan.kernels import triton as T
from wan.kernels.fp8 import quantize_rows
gen = torch.Generator(device="cuda").manual_seed(0)
def randn(*s): return torch.randn(*s, generator=gen, device="cuda").bfloat16()
b, length, c = 1, 2640, 1536
x, y = randn(b, length, c), randn(b, length, c)
gate, shift, scale = randn(b, 3, 1, c), randn(b, 3, 1, c), randn(b, 3, 1, c)
w, bb = randn(c), randn(c)
ops = {"lnm": lambda q: T.OPS["layer_norm_modulate"](x, shift, scale, 1e-6, quantize=q),
       "grlnm": lambda q: T.OPS["gated_residual_layer_norm_modulate"](x, y, gate, shift, scale, 1e-6, quantize=q)[1],
       "grln": lambda q: T.OPS["gated_residual_layer_norm"](x, y, gate, w, bb, 1e-6, quantize=q)[1]}
for name, op in ops.items():
    got, plain = op(True), op(False)
    exp = quantize_rows(plain)
    d = (got.data.float() != exp.data.float())
    idx = d.nonzero()[:4].tolist()
    print(name, "differs", d.float().mean().item())
    for i in idx:
        r, k = i[1], i[2]
        print("  at", i, "plain", plain[0, r, k].item(), "/scale", (plain[0, r, k].float() / exp.scale[0, r, 0]).item(), "got", got.data[0, r, k].float().item(), "exp", exp.data[0, r, k].float().item(), "nbrs got", got.data[0, r, k-1:k+2].float().tolist())
