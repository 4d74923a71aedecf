"""The triton backend's kernels. None are registered yet: the fused Triton kernels are the next
issue, and until then the registry reports "no Triton kernel for this op yet" and `auto` moves on."""
OPS = {}
