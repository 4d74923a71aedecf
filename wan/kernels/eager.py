"""The eager backend: every op in plain torch, on any device and dtype. The twin every other
backend is tested against, and numerically the reference model's math."""
import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention without a mask: [B, Lq, H, D] x [B, Lk, H, D] -> [B, Lq, H, D].
    Scores in float32 at least (float64 stays float64), scale 1/sqrt(D)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    qh, kh, vh = (t.transpose(1, 2).to(acc) for t in (q, k, v))
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * q.shape[-1] ** -0.5
    out = torch.matmul(scores.softmax(dim=-1), vh)
    return out.transpose(1, 2).to(q.dtype)


def layer_norm_modulate(x, shift, scale, eps):
    """x [B, F*S, C]; shift, scale [B, F, 1, C] -> LayerNorm(x) * (1 + scale) + shift."""
    frames = shift.shape[1]
    normed = F.layer_norm(x, (x.shape[-1],), eps=eps).unflatten(1, (frames, -1))
    return torch.addcmul(shift, normed, 1 + scale).flatten(1, 2)


def gated_residual(x, y, gate):
    """x + y * gate; x, y [B, F*S, C], gate [B, F, 1, C]."""
    frames = gate.shape[1]
    return torch.addcmul(x.unflatten(1, (frames, -1)), y.unflatten(1, (frames, -1)),
                         gate).flatten(1, 2)


def rms_norm(x, weight, eps, compute_dtype=None):
    """RMS norm over the last dim, computed in `compute_dtype` (default x's), then [* weight].
    Half-precision inputs asking for float32 go straight in: torch accumulates them in float32."""
    compute = compute_dtype or x.dtype
    if compute == x.dtype or (compute == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)):
        out = F.rms_norm(x, (x.shape[-1],), eps=eps)
    else:
        out = F.rms_norm(x.to(compute), (x.shape[-1],), eps=eps).to(x.dtype)
    return out if weight is None else out * weight


def rope(x, cos, sin, compute_dtype):
    """Rotate the channel pairs (2i, 2i+1) of x [N, L, H, D] by angles with cos/sin [L, D/2],
    as one complex multiply in `compute_dtype` (float32 or float64)."""
    xr = x.to(compute_dtype)
    if xr.stride(-1) != 1 or any(s % 2 for s in xr.stride()[:-1]):
        xr = xr.contiguous()
    rotation = torch.complex(cos.to(compute_dtype), sin.to(compute_dtype))[:, None, :]
    rotated = torch.view_as_complex(xr.unflatten(-1, (-1, 2))) * rotation
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


def norm_rope_store(x, weight, eps, cos, sin, heads, dest=None, slots=None,
                    rope_dtype=torch.float32, per_head_norm=False, rows_per_angle=1):
    """x [N, R, H*D] -> [N, R, H, D], or stored into dest [N, R', H, D] (returned).

    Norm: the backbone's (over H*D, float32, times `weight`) when `weight` is given; the action
    module's (per head, no weight, x's precision) when `per_head_norm`; else none. RoPE in
    `rope_dtype` with cos/sin [R / rows_per_angle, D/2] (row r takes angle row r // rows_per_angle)
    when given. With `slots` [F], row r goes to dest row slots[r // S] * S + r % S (S = R / F)."""
    n, rows, c = x.shape
    head_dim = c // heads
    if weight is not None:
        y = rms_norm(x, weight, eps, torch.float32).reshape(n, rows, heads, head_dim)
    elif per_head_norm:
        y = rms_norm(x.reshape(n, rows, heads, head_dim), None, eps)
    else:
        y = x.reshape(n, rows, heads, head_dim)
    if cos is not None:
        grouped = y.reshape(n, rows // rows_per_angle, rows_per_angle * heads, head_dim)
        y = rope(grouped, cos, sin, rope_dtype).view(n, rows, heads, head_dim)
    if dest is None:
        return y
    if slots is None:
        return dest.copy_(y)
    per_frame = rows // slots.shape[0]
    dest.view(n, -1, per_frame, heads, head_dim).index_copy_(
        1, slots, y.reshape(n, -1, per_frame, heads, head_dim))
    return dest


OPS = {
    "self_attention": attention,
    "cross_attention": attention,
    "mouse_attention": attention,
    "keyboard_attention": attention,
    "layer_norm_modulate": layer_norm_modulate,
    "gated_residual": gated_residual,
    "norm_rope_store": norm_rope_store,
}
