"""FP8 probe: does cuDNN's graph API (nvidia-cudnn-frontend) give us a faster FP8 self-attention
and FP8 VAE-decoder convolutions on the H200, and at what error?

Part A (attention, the DiT's self-attention at its real shape: B=1, 12 heads, head_dim 128, q 2640
tokens, k/v 5280 tokens, non-causal, no mask, scale 1/sqrt(128); q/k/v held as [B, S, H, D]
contiguous bf16 and seen as BHSD dims with BSHD strides):

* `torch_cudnn_bf16`: F.scaled_dot_product_attention under sdpa_kernel([CUDNN_ATTENTION]) (what
  the model runs today);
* `cudnn_fe_bf16`: the same attention as a cudnn-frontend graph, bf16 I/O (API overhead vs gain);
* `cudnn_fe_fp8`: q, k, v as float8_e4m3fn with per-tensor scales (448 / amax), `sdpa_fp8`,
  is_inference; O in bf16 when cuDNN accepts it, else O in e4m3 with a scale_o and dequantized
  after. Plus the time of quantizing q/k/v (all tokens, and only the 2640 new ones, as an fp8 k/v
  cache would need), and the error of other scale_s choices (same graph: the scales are device
  tensors).
Each: error vs float64 math on the bf16 inputs (relative Frobenius norm, max error / max |ref|) on
unit-RMS inputs and on inputs with outlier channels, per-call time (CUDA events, median), a
back-to-back loop time, the CUDA kernels it launches (torch.profiler), and a CUDA-graph check:
capture one call, replay it on new values written into the same buffers, compare with an eager
call on those values (a kernel that escapes the capture leaves NaN/stale output), replay time.

Part B (convs, the decoder shapes of benchmarks/decoder_convs.py): `cudnn_fe_fp8`: X (per-tensor
scale) and W (per-output-channel scale) as e4m3, conv accumulating in float32, a pointwise
multiply by the per-channel descale [1, Cout, 1, 1, 1], fp16 out; every plan timed within
--budget-s; error vs the float32 conv beside the fp16 conv's (torch, cudnn.benchmark with
benchmark_limit=0, i.e. cuDNN's full engine search).

Writes --out (JSON, after each part) and prints a table last. One GPU; ~3-5 minutes:

    python benchmarks/fp8_probe.py --out benchmarks/results/fp8_probe.json
    python benchmarks/fp8_probe.py --parts attention --reps 50 --out /tmp/att.json
"""
import argparse
import datetime
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# torch, cudnn (frontend) and triton (via decoder_convs) are imported in main() / the parts, so
# that --help works on a machine without them.
torch = None
F = None

E4M3_MAX = 448.0
B, H, D = 1, 12, 128
SQ, SKV = 2640, 5280
ATTN_SCALE = 1.0 / math.sqrt(D)
CONV_SHAPES = "c96,c192,c384_88,r192_96"
T_START = time.time()


def log(msg):
    print(f"[{time.time() - T_START:6.1f}s] {msg}", flush=True)


def err_text(exc):
    return f"{type(exc).__name__}: {exc}"[:300]


def sync():
    torch.cuda.synchronize()


# ---------------------------------------------------------------------------------- timing tools
def bench(fn, reps, warmup=3):
    """decoder_convs.bench: per-call CUDA events, synchronized, (median, min) ms."""
    from benchmarks.decoder_convs import bench as dc_bench
    return dc_bench(fn, reps, warmup)


def loop_ms(fn, reps):
    """Back-to-back calls between two events: the GPU time when the host keeps ahead of the GPU,
    the host time per call when it does not (per-call bench() always includes the launch)."""
    fn()
    sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def kernel_names(fn, calls=2):
    """The CUDA kernels (and memcpy/memset) fn launches, in order of first appearance: proof of
    which kernel runs (an FP8 attention has e4m3 / fp8 in its name)."""
    from torch.profiler import ProfilerActivity, profile
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync()
    names = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.name not in names:
            names.append(e.name)
    return [n[:240] for n in names]


def graphed_ms(fn, reps):
    """fn captured into a CUDA graph, replay time (median ms): the GPU time without host cost."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    med, _ = bench(g.replay, reps)
    return med


def poison(t):
    """Fill an output with NaN (e4m3fn: byte 0x7f) so a write that did not happen shows."""
    if t.dtype == torch.float8_e4m3fn:
        t.view(torch.uint8).fill_(0x7F)
    else:
        t.fill_(float("nan"))


def graph_check(run, as_float, load_new, reps, handle=None):
    """Capture one run() into a CUDA graph (torch captures on a side stream; the cudnn handle gets
    that stream inside the capture), write new values into the inputs (load_new, eager), poison
    the output with NaN, replay, and compare with an eager run on the same values. A kernel that
    launches on another stream escapes the capture (error, or NaN/stale output here)."""
    if handle is not None:
        import cudnn
    rec = {}
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on the side stream, as torch's docs ask
            if handle is not None:
                cudnn.set_stream(handle, side.cuda_stream)
            run()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            if handle is not None:
                cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)
            static = run()
    finally:
        if handle is not None:
            cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)
    load_new()
    poison(static)
    g.replay()
    sync()
    y_replay = as_float(static).clone()
    poison(static)
    y_eager = as_float(run()).clone()
    sync()
    diff = (y_replay - y_eager).abs()
    rec["graph_bitwise"] = bool(torch.equal(y_replay, y_eager))
    rec["graph_nan"] = bool(torch.isnan(y_replay).any())
    rec["graph_max_diff"] = float(diff.nan_to_num(float("inf")).max())
    rec["graph_rel_diff"] = float((diff.nan_to_num(float("inf")).norm()
                                   / y_eager.norm().clamp_min(1e-30)))
    rec["graph_ok"] = rec["graph_bitwise"] or (not rec["graph_nan"] and rec["graph_rel_diff"] < 1e-3)
    rec["graph_ms"], rec["graph_min_ms"] = bench(g.replay, reps)
    del g
    return rec


# ---------------------------------------------------------------------------------- cudnn plans
def plan_kind(g, i):
    """'python' for a cudnn-frontend python (FROST, JIT-compiled) engine, 'backend' for cuDNN's."""
    try:  # private attribute: fine for a probe
        from cudnn.engines.engine_ids import is_python_engine
        return "python" if is_python_engine(g._plans[i].engine_id) else "backend"
    except Exception:  # noqa: BLE001
        return "?"


def time_plans(g, pack, handle, check, reps, budget_s, skip_python=False, label=""):
    """Build, check and time every plan of g (within budget_s, checked before each plan).
    check() -> error dict of the output just written. Returns (plan records, best index or None,
    {index: workspace})."""
    t0 = time.time()
    count = g.get_execution_plan_count()
    log(f"  {label}: {count} plans")
    plans, workspaces = [], {}
    for i in range(count):
        if time.time() - t0 > budget_s:
            plans.append({"index": i, "note": f"not tried: budget {budget_s} s spent"})
            break
        rec = {"index": i}
        try:
            rec["plan"] = g.get_plan_name_at_index(i)
            rec["kind"] = plan_kind(g, i)
            if skip_python and rec["kind"] == "python":
                rec["note"] = "python engine skipped (--skip-python-engines)"
                plans.append(rec)
                continue
            tb = time.time()
            g.build_plan_at_index(i)
            ws = g.get_workspace_size_plan_at_index(i)
            workspace = torch.empty(max(ws, 1), dtype=torch.uint8, device="cuda")
            fn = lambda i=i, w=workspace: g.execute_plan_at_index(pack, w, i, handle=handle)  # noqa: E731
            fn()
            sync()
            rec["build_s"] = time.time() - tb  # incl. the first call (a JIT engine compiles then)
            rec["workspace"] = ws
            rec.update(check())
            rec["ms"], rec["min_ms"] = bench(fn, reps)
            workspaces[i] = workspace
            log(f"    [{i}] {rec['plan'][:70]} ({rec['kind']}): {rec['ms']:.4f} ms "
                f"rel_norm {rec['rel_norm']:.2e}")
        except Exception as exc:  # noqa: BLE001
            rec["error"] = err_text(exc)
            log(f"    [{i}] ERROR {rec['error'][:160]}")
        plans.append(rec)
    # a plan whose output is garbage must not win on speed (FP8 error is ~1e-2, not 0.2)
    ok = [p for p in plans if "ms" in p and p.get("rel_norm", math.nan) < 0.2]
    best = min(ok, key=lambda p: p["ms"])["index"] if ok else None
    return plans, best, workspaces


def finish_graph(g, support_label, modes=("A", "FALLBACK")):
    """validate -> operation graph -> heuristics -> check_support. check_support's verdict is
    recorded, not fatal: the frontend's plan walk may still find a python engine."""
    import cudnn
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([getattr(cudnn.heur_mode, m) for m in modes])
    try:
        g.check_support()
        return "ok"
    except Exception as exc:  # noqa: BLE001
        log(f"  {support_label}: check_support: {err_text(exc)[:200]}")
        return err_text(exc)


# ---------------------------------------------------------------------------------- Part A
def attention_inputs(seed, outlier_tensors, outlier_scale):
    """q, k: N(0, 1) normalized to unit RMS over the head dim (what RMS norm leaves, weight ~1); v:
    N(0, 1). Outliers: 4 fixed channels of the named tensors scaled (a per-tensor scale then has
    to cover them, costing the other channels resolution)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rms_normed(s):
        x = torch.randn((B, s, H, D), generator=gen, device="cuda")
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    q, k = rms_normed(SQ), rms_normed(SKV)
    v = torch.randn((B, SKV, H, D), generator=gen, device="cuda")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if name in outlier_tensors:
            t[..., [5, 37, 70, 111]] *= outlier_scale
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def attention_ref(q, k, v):
    """float64 softmax(q k^T * scale) v of the bf16 values, per head; [B, S, H, D] float64."""
    out = torch.empty((B, SQ, H, D), dtype=torch.float64, device="cuda")
    for h in range(H):
        qh, kh, vh = (t[0, :, h].double() for t in (q, k, v))
        p = torch.softmax((qh @ kh.T) * ATTN_SCALE, dim=-1)
        out[0, :, h] = p @ vh
    return out


def att_errors(y, ref):
    d = y.double() - ref
    return {"rel_norm": float(d.norm() / ref.norm()),
            "max_err_rel": float(d.abs().max() / ref.abs().max()),
            "nan": bool(torch.isnan(y).any())}


def quantize_into(src, dst, descale):
    """Per-tensor e4m3: dst = src * 448 / amax (saturated), descale = amax / 448 as float32
    [1, 1, 1, 1]. All on the device (no host sync), so it can sit in a CUDA graph."""
    amax = src.abs().amax().float().clamp_min(1e-12)
    dst.copy_((src.float() * (E4M3_MAX / amax)).clamp_(-E4M3_MAX, E4M3_MAX))
    descale.copy_((amax / E4M3_MAX).view(1, 1, 1, 1))


class AttnBuffers:
    """Static buffers every candidate reads/writes (so one CUDA graph replays on new values)."""

    def __init__(self):
        def e(s, dt):
            return torch.empty((B, s, H, D), dtype=dt, device="cuda")

        self.q, self.k, self.v = e(SQ, torch.bfloat16), e(SKV, torch.bfloat16), e(SKV, torch.bfloat16)
        f8 = torch.float8_e4m3fn
        self.q8, self.k8, self.v8 = e(SQ, f8), e(SKV, f8), e(SKV, f8)
        self.o = e(SQ, torch.bfloat16)
        self.o8 = e(SQ, f8)
        self.o_deq = e(SQ, torch.bfloat16)

        def s(val=1.0):
            return torch.full((1, 1, 1, 1), val, dtype=torch.float32, device="cuda")

        self.dq, self.dk, self.dv = s(), s(), s()
        self.scale_s, self.descale_s = s(), s()
        self.scale_o, self.descale_o = s(), s()
        self.amax_o, self.amax_s = s(float("nan")), s(float("nan"))

    def load_bf16(self, qkv):
        for dst, src in zip((self.q, self.k, self.v), qkv):
            dst.copy_(src)

    def quantize(self):
        quantize_into(self.q, self.q8, self.dq)
        quantize_into(self.k, self.k8, self.dk)
        quantize_into(self.v, self.v8, self.dv)

    def quantize_new_tokens(self, n=SQ):
        """What an fp8 k/v cache would need per call: q and the n newest k/v tokens (timing only:
        the slices get their own amax, i.e. a per-block scale)."""
        quantize_into(self.q, self.q8, self.dq)
        quantize_into(self.k[:, -n:], self.k8[:, -n:], self.dk)
        quantize_into(self.v[:, -n:], self.v8[:, -n:], self.dv)

    def set_scale_s(self, scale_s):
        self.scale_s.fill_(scale_s)
        self.descale_s.fill_(1.0 / scale_s)

    def set_scale_o(self, scale_o):
        self.scale_o.fill_(scale_o)
        self.descale_o.fill_(1.0 / scale_o)


def bhsd(t):
    """[B, S, H, D] buffer -> the BHSD view (BSHD strides) the graph / torch SDPA get."""
    return t.transpose(1, 2)


def build_fe_bf16(cudnn, handle, buf):
    bf16, f32 = cudnn.data_type.BFLOAT16, cudnn.data_type.FLOAT
    g = cudnn.pygraph(io_data_type=bf16, intermediate_data_type=f32, compute_data_type=f32,
                      handle=handle, is_cuda_graph_replay_expected=True)
    views = [bhsd(t) for t in (buf.q, buf.k, buf.v, buf.o)]
    Q, K, V = (g.tensor(name=n, dim=list(t.shape), stride=list(t.stride()), data_type=bf16)
               for n, t in zip("QKV", views))
    O, _stats = g.sdpa(q=Q, k=K, v=V, is_inference=True, attn_scale=ATTN_SCALE, name="sdpa")
    O.set_output(True).set_dim(list(views[3].shape)).set_stride(list(views[3].stride())) \
        .set_data_type(bf16)
    support = finish_graph(g, "cudnn_fe_bf16")
    return g, {Q: views[0], K: views[1], V: views[2], O: views[3]}, support


def build_fe_fp8(cudnn, handle, buf, o_bf16, declare_amax_o, declare_amax_s):
    """sdpa_fp8 graph over the e4m3 buffers; O bf16 (o_bf16) or e4m3 (+ scale_o)."""
    bf16, f32, e4m3 = cudnn.data_type.BFLOAT16, cudnn.data_type.FLOAT, cudnn.data_type.FP8_E4M3
    g = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32,
                      handle=handle, is_cuda_graph_replay_expected=True)
    out = bhsd(buf.o if o_bf16 else buf.o8)
    views = [bhsd(t) for t in (buf.q8, buf.k8, buf.v8)]
    Q, K, V = (g.tensor(name=n, dim=list(t.shape), stride=list(t.stride()), data_type=e4m3)
               for n, t in zip("QKV", views))
    scalars = {n: g.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)
               for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")}
    O, _stats, amax_s, amax_o = g.sdpa_fp8(
        q=Q, k=K, v=V, **scalars, is_inference=True, attn_scale=ATTN_SCALE, name="sdpa_fp8")
    O.set_output(True).set_dim(list(out.shape)).set_stride(list(out.stride())) \
        .set_data_type(bf16 if o_bf16 else e4m3)
    pack = {Q: views[0], K: views[1], V: views[2], O: out,
            scalars["descale_q"]: buf.dq, scalars["descale_k"]: buf.dk,
            scalars["descale_v"]: buf.dv, scalars["descale_s"]: buf.descale_s,
            scalars["scale_s"]: buf.scale_s, scalars["scale_o"]: buf.scale_o}
    for declare, t, data in ((declare_amax_o, amax_o, buf.amax_o), (declare_amax_s, amax_s, buf.amax_s)):
        if declare:
            t.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
            pack[t] = data
    support = finish_graph(g, "cudnn_fe_fp8")
    return g, pack, support


def evaluate_attention(rec, run, as_float, load, sets, reps, handle=None):
    """The common measurements of one attention candidate (rec gets them)."""
    load("normal")
    y = as_float(run())
    sync()
    rec.update(att_errors(y, sets["normal"]["ref"]))
    rec["ms"], rec["min_ms"] = bench(run, reps, warmup=5)
    rec["loop_ms"] = loop_ms(run, reps)
    try:
        rec["kernels"] = kernel_names(run)
    except Exception as exc:  # noqa: BLE001
        rec["kernels_error"] = err_text(exc)
    try:
        rec.update(graph_check(run, as_float, lambda: load("new"), reps, handle))
    except Exception as exc:  # noqa: BLE001
        rec["graph_ok"] = False
        rec["graph_error"] = err_text(exc)
        traceback.print_exc()
    load("outliers")
    y = as_float(run())
    sync()
    rec["outliers"] = att_errors(y, sets["outliers"]["ref"])
    load("normal")
    log(f"  {rec['candidate']}: {rec['ms']:.4f} ms (graph {rec.get('graph_ms', math.nan):.4f}, "
        f"ok {rec.get('graph_ok')}) rel_norm {rec['rel_norm']:.2e} "
        f"(outliers {rec['outliers']['rel_norm']:.2e})")


def part_attention(args, record):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    res = record["attention"] = {"shape": {"B": B, "H": H, "D": D, "Sq": SQ, "Skv": SKV,
                                           "attn_scale": ATTN_SCALE, "layout": "BSHD buffers"},
                                 "outliers": {"tensors": args.outlier_tensors,
                                              "scale": args.outlier_scale,
                                              "channels": [5, 37, 70, 111]},
                                 "results": []}
    results = res["results"]
    # three input sets: the measured one, the graph check's new values, the outlier one
    sets = {}
    for i, name in enumerate(("normal", "new", "outliers")):
        qkv = attention_inputs(i, args.outlier_tensors if name == "outliers" else "",
                               args.outlier_scale)
        sets[name] = {"qkv": qkv, "ref": attention_ref(*qkv)}
        sets[name]["o_amax"] = float(sets[name]["ref"].abs().max())
        res.setdefault("input_amax", {})[name] = {n: float(t.abs().max()) for n, t in
                                                  zip("qkv", qkv)}
    res["o_amax"] = {n: s["o_amax"] for n, s in sets.items()}
    buf = AttnBuffers()
    log(f"attention inputs + float64 references ready; |O| max {res['o_amax']}")

    # 1. torch SDPA on cuDNN (the baseline)
    rec = {"candidate": "torch_cudnn_bf16"}
    try:
        def run_torch():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(bhsd(buf.q), bhsd(buf.k), bhsd(buf.v),
                                                      scale=ATTN_SCALE)

        evaluate_attention(rec, run_torch, lambda o: o.transpose(1, 2).float(),
                           lambda n: buf.load_bf16(sets[n]["qkv"]), sets, args.reps)
    except Exception as exc:  # noqa: BLE001
        rec["error"] = err_text(exc)
        traceback.print_exc()
    results.append(rec)
    write(record, args.out)

    import cudnn
    handle = cudnn.create_handle()
    cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)

    def fe_walk(rec, g, pack, check):
        """Time every plan, keep the fastest that runs; -> run() on it (returns the O view)."""
        plans, best, workspaces = time_plans(g, pack, handle, check, args.reps, args.budget_s,
                                             args.skip_python_engines, rec["candidate"])
        rec["plans"] = plans
        if best is None:
            raise RuntimeError("no plan built and ran: " + " | ".join(
                p.get("error", p.get("note", "")) for p in plans)[:600])
        chosen = next(p for p in plans if p["index"] == best)
        rec["plan_index"], rec["plan"], rec["plan_kind"] = best, chosen["plan"], chosen["kind"]
        ws, out_view = workspaces[best], pack_output(pack)

        def run():
            g.execute_plan_at_index(pack, ws, best, handle=handle)
            return out_view

        return run

    def pack_output(pack):
        # O: the pack entry that views buf.o / buf.o8 (the [B, H, Sq, D] view)
        for t in pack.values():
            if t.dim() == 4 and t.shape[2] == SQ and t.data_ptr() in (buf.o.data_ptr(),
                                                                     buf.o8.data_ptr()):
                return t
        raise RuntimeError("no O in the pack")

    # 2. the same attention through the graph API, bf16
    rec = {"candidate": "cudnn_fe_bf16"}
    try:
        buf.load_bf16(sets["normal"]["qkv"])
        g, pack, rec["check_support"] = build_fe_bf16(cudnn, handle, buf)
        run = fe_walk(rec, g, pack, lambda: att_errors(buf.o.float(), sets["normal"]["ref"]))
        evaluate_attention(rec, run, lambda o: o.transpose(1, 2).float(),
                           lambda n: buf.load_bf16(sets[n]["qkv"]), sets, args.reps, handle)
    except Exception as exc:  # noqa: BLE001
        rec["error"] = err_text(exc)
        traceback.print_exc()
    results.append(rec)
    write(record, args.out)

    # 3. FP8
    scale_s_values = [float(s) for s in args.scale_s.split(",") if s]
    buf.set_scale_s(scale_s_values[0])
    res["fp8_recipe"] = {
        "q_k_v": "per-tensor e4m3, scale = 448 / amax, descale = amax / 448 (float32 [1,1,1,1])",
        "scale_s": scale_s_values[0], "descale_s": 1.0 / scale_s_values[0],
        "scale_s_note": "P (un-normalized, in [0, 1] relative to the running max) is multiplied by "
                        "scale_s before its e4m3 cast inside the kernel",
        "scale_o": "bf16 O: 1.0; e4m3 O: 448 / (margin x amax of the input set's O), i.e. an "
                   "ideal delayed scaling", "scale_o_margin": args.scale_o_margin}
    rec = {"candidate": "cudnn_fe_fp8"}
    results.append(rec)
    try:
        # quantization cost, each captured in a CUDA graph (GPU time; eager adds ~5 launches each)
        buf.load_bf16(sets["normal"]["qkv"])
        q_times = {}
        for label, fn in (("quant_q_k_v_all_ms", buf.quantize),
                          ("quant_new_tokens_ms", buf.quantize_new_tokens),
                          ("quant_q_only_ms", lambda: quantize_into(buf.q, buf.q8, buf.dq))):
            try:
                q_times[label] = graphed_ms(fn, args.reps)
                q_times[label.replace("_ms", "_eager_ms")] = bench(fn, args.reps)[0]
            except Exception as exc:  # noqa: BLE001
                q_times[label + "_error"] = err_text(exc)
        res["quantization"] = q_times
        log(f"  quantization: {q_times}")

        state = {"o_bf16": None}

        def load_fp8(n):
            buf.load_bf16(sets[n]["qkv"])
            buf.quantize()
            buf.set_scale_o(1.0 if state["o_bf16"] else
                            E4M3_MAX / (args.scale_o_margin * sets[n]["o_amax"]))

        def as_float_fp8(o):
            if state["o_bf16"]:
                return o.transpose(1, 2).float()
            return o.transpose(1, 2).float() * buf.descale_o.view(1, 1, 1, 1)

        # try bf16 O first (no dequant pass), then e4m3 O; Amax outputs declared or not
        attempts = rec["attempts"] = []
        run = None
        for o_bf16, amax_o, amax_s in ((True, True, False), (True, False, False),
                                       (False, True, False), (False, True, True),
                                       (False, False, False)):
            att = {"o_dtype": "bf16" if o_bf16 else "e4m3", "amax_o_output": amax_o,
                   "amax_s_output": amax_s}
            attempts.append(att)
            try:
                state["o_bf16"] = o_bf16
                load_fp8("normal")
                g, pack, att["check_support"] = build_fe_fp8(cudnn, handle, buf, o_bf16,
                                                             amax_o, amax_s)
                run = fe_walk(rec, g, pack, lambda: att_errors(
                    as_float_fp8(pack_output(pack)), sets["normal"]["ref"]))
                att["ok"] = True
                rec.update({k: att[k] for k in ("o_dtype", "amax_o_output", "amax_s_output")})
                break
            except Exception as exc:  # noqa: BLE001
                att["ok"] = False
                att["error"] = err_text(exc)
                att["plans"] = rec.pop("plans", None)
                log(f"  fp8 attempt O {att['o_dtype']} amax_o {amax_o} amax_s {amax_s}: "
                    f"{att['error'][:200]}")
        rec["o_bf16_supported"] = any(a.get("ok") for a in attempts if a["o_dtype"] == "bf16")
        if run is None:
            raise RuntimeError("no sdpa_fp8 variant ran: " + " | ".join(
                f"O {a['o_dtype']}: {a.get('error', '')}" for a in attempts)[:600])
        evaluate_attention(rec, run, as_float_fp8, load_fp8, sets, args.reps, handle)
        names = " ".join(rec.get("kernels", [])).lower()
        rec["fp8_kernel_seen"] = any(s in names for s in ("fp8", "e4m3", "f8"))
        write(record, args.out)
        # what the kernel reports as Amax_O (before or after scale_o?) beside the true |O| max
        if rec["amax_o_output"]:
            load_fp8("normal")
            run()
            sync()
            rec["amax_o_reported"] = float(buf.amax_o)
            rec["amax_o_true"] = sets["normal"]["o_amax"]
            rec["scale_o_used"] = float(buf.scale_o)
        if not state["o_bf16"]:
            # e4m3 O: the dequantization to bf16 it needs after (GPU time in a CUDA graph)
            try:
                rec["dequant_o_ms"] = graphed_ms(
                    lambda: buf.o_deq.copy_(buf.o8.float() * buf.descale_o.view(1, 1, 1, 1)),
                    args.reps)
            except Exception as exc:  # noqa: BLE001
                rec["dequant_o_error"] = err_text(exc)
            # the uncalibrated scale_o (|O| <= max |v| always holds) instead
            load_fp8("normal")
            buf.set_scale_o(E4M3_MAX / float(buf.v.abs().max()))
            rec["scale_o_vbound"] = att_errors(as_float_fp8(run()), sets["normal"]["ref"])
        # the other scale_s values: device scalars, so the same graph and plan
        rec["scale_s_sweep"] = {}
        for s_val in scale_s_values:
            buf.set_scale_s(s_val)
            rec["scale_s_sweep"][str(s_val)] = row = {}
            for n in ("normal", "outliers"):
                load_fp8(n)
                row[n] = att_errors(as_float_fp8(run()), sets[n]["ref"])
        buf.set_scale_s(scale_s_values[0])
        log("  fp8 scale_s sweep: " + ", ".join(
            f"{k}: {v['normal']['rel_norm']:.2e}/{v['outliers']['rel_norm']:.2e}"
            for k, v in rec["scale_s_sweep"].items()))
    except Exception as exc:  # noqa: BLE001
        rec["error"] = err_text(exc)
        traceback.print_exc()
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- Part B
def build_conv_fp8(cudnn, handle, x8, w8, descale, out, padding, variant):
    """FP8 conv graph. variant 'mul_descale': conv (float32) * descale[1, Cout, 1..] -> fp16 out;
    'plain_float': the conv alone, float32 out (descale applied outside, for the error only; a
    support check in case the pointwise epilogue is what cuDNN refuses. Not fp16 out: the raw
    e4m3 products are ~(448/amax)^2 too large for fp16's range)."""
    half, f32, e4m3 = cudnn.data_type.HALF, cudnn.data_type.FLOAT, cudnn.data_type.FP8_E4M3
    g = cudnn.pygraph(io_data_type=half, intermediate_data_type=f32, compute_data_type=f32,
                      handle=handle)
    X = g.tensor(name="X", dim=list(x8.shape), stride=list(x8.stride()), data_type=e4m3)
    W = g.tensor(name="W", dim=list(w8.shape), stride=list(w8.stride()), data_type=e4m3)
    nd = len(padding)
    Y = g.conv_fprop(image=X, weight=W, padding=padding, stride=[1] * nd, dilation=[1] * nd,
                     compute_data_type=f32, name="conv")
    pack = {X: x8, W: w8}
    if variant == "mul_descale":
        Y.set_data_type(f32)
        Dt = g.tensor(name="descale", dim=list(descale.shape), stride=list(descale.stride()),
                      data_type=f32)
        Y = g.mul(a=Y, b=Dt, compute_data_type=f32, name="descale")
        pack[Dt] = descale
    Y.set_output(True).set_data_type(half if out.dtype == torch.float16 else f32) \
        .set_dim(list(out.shape)).set_stride(list(out.stride()))
    pack[Y] = out
    support = finish_graph(g, f"conv fp8 {variant}", ("A", "B", "FALLBACK"))
    return g, pack, support


def conv_shape(name, args, handle):
    import cudnn
    from benchmarks.decoder_convs import SHAPES, errors, make_inputs, tflop
    cin, cout, k, frames, h, w, per_block, conv2d, _bias = SHAPES[name]
    rec = {"shape": {"cin": cin, "cout": cout, "kernel": list(k), "window_frames": frames,
                     "h": h, "w": w, "per_block": per_block, "conv2d": conv2d,
                     "tflop": tflop(name), "bias": "not included (plain conv)"},
           "results": []}
    x, x4, weight, _ = make_inputs(name)
    if conv2d:  # 12 frames of a 2-D conv, as torch / the decoder call it
        xg = x4
        wg = weight[:, :, 0].contiguous(memory_format=torch.channels_last)
        padding = [1, 1]
        conv = lambda xx, ww: F.conv2d(xx, ww, None, 1, 1)  # noqa: E731
        out = torch.empty(x4.shape[0], cout, h, w, dtype=torch.float16, device="cuda",
                          memory_format=torch.channels_last)
    else:
        xg = x
        wg = weight.contiguous(memory_format=torch.channels_last_3d)
        padding = [0, k[1] // 2, k[2] // 2]
        conv = lambda xx, ww: F.conv3d(xx, ww, None, 1, padding)  # noqa: E731
        out = torch.empty(1, cout, frames - k[0] + 1, h, w, dtype=torch.float16, device="cuda",
                          memory_format=torch.channels_last_3d)
    # float32 reference (TF32 off, no engine search for it)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    ref = conv(xg.float(), wg.float())
    sync()
    results = rec["results"]

    # fp16, torch, cuDNN's full engine search (the first calls search; bench warms up)
    r = {"candidate": "torch_fp16_bench0"}
    try:
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.benchmark_limit = 0
        tb = time.time()
        y = conv(xg, wg)
        sync()
        r["first_call_s"] = time.time() - tb
        r.update(errors(y, ref))
        r["ms"], r["min_ms"] = bench(lambda: conv(xg, wg), args.reps, warmup=3)
        r["tflops"] = tflop(name) / (r["ms"] / 1e3)
        log(f"  {name} torch_fp16_bench0: {r['ms']:.3f} ms rel_norm {r['rel_norm']:.2e}")
        del y
    except Exception as exc:  # noqa: BLE001
        r["error"] = err_text(exc)
        traceback.print_exc()
    finally:
        torch.backends.cudnn.benchmark = False
    results.append(r)
    fp16_err = r.get("rel_norm")

    # FP8: X per-tensor, W per output channel, descale per output channel
    r = {"candidate": "cudnn_fe_fp8"}
    try:
        f8 = torch.float8_e4m3fn
        x_amax = xg.abs().amax().float().clamp_min(1e-12)
        sx = E4M3_MAX / x_amax
        x8 = torch.empty_like(xg, dtype=f8)

        def quant_x():
            amax = xg.abs().amax().float().clamp_min(1e-12)
            x8.copy_((xg.float() * (E4M3_MAX / amax)).clamp_(-E4M3_MAX, E4M3_MAX))

        quant_x()
        if x8.stride() != xg.stride():
            raise RuntimeError(f"x8 strides {x8.stride()} != x strides {xg.stride()}")
        w_amax = wg.abs().float().amax(dim=tuple(range(1, wg.dim()))).clamp_min(1e-12)
        sw = E4M3_MAX / w_amax
        bshape = (1, cout) + (1,) * (wg.dim() - 2)
        w8 = torch.empty_like(wg, dtype=f8)
        w8.copy_((wg.float() * sw.view((cout,) + (1,) * (wg.dim() - 1))).clamp_(-E4M3_MAX, E4M3_MAX))
        descale = (1.0 / (sx * sw)).float().view(bshape).contiguous()
        r["x_amax"], r["w_amax_range"] = float(x_amax), [float(w_amax.min()), float(w_amax.max())]
        r["quant_x_ms"] = bench(quant_x, max(3, args.reps // 2))[0]
        r["variants"] = {}
        timed = False
        for variant in ("mul_descale", "plain_float"):
            v = r["variants"][variant] = {}
            try:
                if variant == "plain_float":
                    out32 = torch.empty_like(out, dtype=torch.float32)
                g, pack, v["check_support"] = build_conv_fp8(
                    cudnn, handle, x8, w8, descale, out if variant == "mul_descale" else out32,
                    padding, variant)
                v["plan_count"] = g.get_execution_plan_count()
                v["plan_names"] = []
                for i in range(min(v["plan_count"], 12)):
                    try:
                        v["plan_names"].append(g.get_plan_name_at_index(i))
                    except Exception as exc:  # noqa: BLE001
                        v["plan_names"].append(f"? {err_text(exc)[:80]}")
                if timed:  # one variant timed is enough; the others: support only
                    continue
                if variant == "mul_descale":
                    check = lambda: errors(out, ref)  # noqa: E731
                else:
                    check = lambda: errors(out32 * descale, ref)  # noqa: E731
                plans, best, _ = time_plans(g, pack, handle, check, max(3, args.reps // 2),
                                            args.budget_s, args.skip_python_engines,
                                            f"{name} fp8 {variant}")
                v["plans"] = plans
                if best is not None:
                    timed = True
                    b = next(p for p in plans if p["index"] == best)
                    r.update({"variant": variant, "plan": b["plan"], "ms": b["ms"],
                              "min_ms": b["min_ms"], "rel_norm": b["rel_norm"],
                              "max_err_rel": b["max_err_rel"],
                              "tflops": tflop(name) / (b["ms"] / 1e3)})
                    if fp16_err:
                        r["err_vs_fp16_err"] = b["rel_norm"] / fp16_err
                    if variant == "plain_float":
                        r["note"] = "conv to float32 out, descale not in the timed graph"
            except Exception as exc:  # noqa: BLE001
                v["error"] = err_text(exc)
                log(f"  {name} fp8 {variant}: {v['error'][:200]}")
            finally:
                torch.cuda.empty_cache()
        if not timed:
            r["error"] = "no FP8 conv plan ran: " + " | ".join(
                f"{k_}: {v_.get('error') or v_.get('check_support')}" for k_, v_ in
                r["variants"].items())[:600]
    except Exception as exc:  # noqa: BLE001
        r["error"] = err_text(exc)
        traceback.print_exc()
    results.append(r)
    return rec


def part_conv(args, record):
    import cudnn
    handle = cudnn.create_handle()
    cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)
    res = record["conv"] = {}
    for name in [s for s in args.conv_shapes.split(",") if s]:
        if time.time() - T_START > args.deadline_s:
            res[name] = {"skipped": f"deadline {args.deadline_s} s reached"}
            continue
        t0 = time.time()
        try:
            res[name] = conv_shape(name, args, handle)
        except Exception as exc:  # noqa: BLE001
            res[name] = {"error": err_text(exc)}
            traceback.print_exc()
        torch.cuda.empty_cache()
        log(f"conv {name}: {time.time() - t0:.1f} s")
        write(record, args.out)


# ---------------------------------------------------------------------------------- output
def write(record, out):
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=1, default=str)


def fmt(v, spec):
    width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0)
    return format(v, spec) if isinstance(v, (int, float)) and v == v else "-".rjust(width)


def print_tables(record):
    att = record.get("attention")
    if att:
        rows = att["results"]
        base = next((r for r in rows if r["candidate"] == "torch_cudnn_bf16" and "ms" in r), None)
        print(f"\nattention B{B} H{H} D{D} Sq{SQ} Skv{SKV} (ms per call; 'x base' = baseline ms / "
              f"ms, eager and graph replay; rel_norm vs float64)")
        print(f"{'candidate':18} {'ms':>8} {'graph ms':>9} {'x base':>7} {'x base(g)':>9} "
              f"{'rel_norm':>9} {'outliers':>9} {'graph_ok':>8}  notes")
        for r in rows:
            if "ms" not in r:
                print(f"{r['candidate']:18} ERROR {r.get('error', '')[:150]}")
                continue
            xb = base["ms"] / r["ms"] if base else math.nan
            xg = (base["graph_ms"] / r["graph_ms"]
                  if base and "graph_ms" in base and "graph_ms" in r else math.nan)
            note = ""
            if r["candidate"] == "cudnn_fe_fp8":
                note = (f"O {r.get('o_dtype')}, bf16 O supported: {r.get('o_bf16_supported')}, "
                        f"fp8 kernel seen: {r.get('fp8_kernel_seen')}")
            print(f"{r['candidate']:18} {fmt(r['ms'], '8.4f')} {fmt(r.get('graph_ms'), '9.4f')} "
                  f"{fmt(xb, '7.2f')} {fmt(xg, '9.2f')} {fmt(r['rel_norm'], '9.2e')} "
                  f"{fmt(r.get('outliers', {}).get('rel_norm'), '9.2e')} {str(r.get('graph_ok')):>8}  {note}")
        q = att.get("quantization", {})
        for key in ("quant_q_k_v_all_ms", "quant_new_tokens_ms"):
            if key in q:
                print(f"{key:18} {fmt(q[key], '8.4f')} (CUDA graph; eager "
                      f"{fmt(q.get(key.replace('_ms', '_eager_ms')), '.4f')})")
        fp8 = next((r for r in rows if r["candidate"] == "cudnn_fe_fp8"), {})
        if "dequant_o_ms" in fp8:
            print(f"{'dequant_o_ms':18} {fmt(fp8['dequant_o_ms'], '8.4f')} (CUDA graph)")
    for name, s in record.get("conv", {}).items():
        if "results" not in s:
            print(f"\nconv {name}: {s}")
            continue
        rows = s["results"]
        base = next((r for r in rows if r["candidate"] == "torch_fp16_bench0" and "ms" in r), None)
        print(f"\nconv {name} ({s['shape']['cin']}->{s['shape']['cout']}, "
              f"{s['shape']['tflop']:.3f} TFLOP; rel_norm vs float32)")
        print(f"{'candidate':18} {'ms':>8} {'x base':>7} {'rel_norm':>9} {'/fp16 err':>9} "
              f"{'graph_ok':>8}  notes")
        for r in rows:
            if "ms" not in r:
                print(f"{r['candidate']:18} ERROR {r.get('error', '')[:200]}")
                continue
            xb = base["ms"] / r["ms"] if base else math.nan
            note = (f"{r.get('variant')} {str(r.get('plan'))[:40]}, quant_x "
                    f"{fmt(r.get('quant_x_ms'), '.3f')} ms" if r["candidate"] != "torch_fp16_bench0"
                    else "")
            print(f"{r['candidate']:18} {fmt(r['ms'], '8.3f')} {fmt(xb, '7.2f')} "
                  f"{fmt(r['rel_norm'], '9.2e')} {fmt(r.get('err_vs_fp16_err'), '9.2f')} "
                  f"{'-':>8}  {note}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="attention,conv", help="attention,conv")
    parser.add_argument("--reps", type=int, default=30, help="timed calls per measurement (>= 20)")
    parser.add_argument("--budget-s", type=float, default=20.0,
                        help="seconds of plan building/timing per cuDNN graph")
    parser.add_argument("--deadline-s", type=float, default=380.0,
                        help="skip the remaining conv shapes after this many seconds")
    parser.add_argument("--conv-shapes", default=CONV_SHAPES,
                        help="decoder_convs.SHAPES names")
    parser.add_argument("--scale-s", default="448,256,32",
                        help="scale_s values (descale_s = 1 / scale_s); the first is the candidate, "
                             "all get their error measured")
    parser.add_argument("--scale-o-margin", type=float, default=1.25,
                        help="e4m3 O: scale_o = 448 / (margin * |O| max)")
    parser.add_argument("--outlier-tensors", default="k,v",
                        help="which of q,k,v get the 4 outlier channels")
    parser.add_argument("--outlier-scale", type=float, default=8.0)
    parser.add_argument("--skip-python-engines", action="store_true",
                        help="do not build cudnn-frontend python (JIT) engine plans")
    parser.add_argument("--out", default="benchmarks/results/fp8_probe.json", help="JSON file")
    args = parser.parse_args()
    args.outlier_tensors = args.outlier_tensors.replace(" ", "")

    global torch, F
    import torch as _torch
    import torch.nn.functional as _F
    torch, F = _torch, _F
    parts = [p for p in args.parts.split(",") if p]
    record = {"benchmark": "fp8_probe", "device": torch.cuda.get_device_name(),
              "capability": list(torch.cuda.get_device_capability()),
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "cudnn_torch": torch.backends.cudnn.version(), "python": platform.python_version(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join(sys.argv), "args": vars(args)}
    try:
        import cudnn
        record["cudnn_frontend"] = getattr(cudnn, "__version__", "?")
        record["cudnn_backend"] = cudnn.backend_version()
    except Exception as exc:  # noqa: BLE001
        record["cudnn_frontend_error"] = err_text(exc)
    log(f"{record['device']} torch {record['torch']} cuDNN {record['cudnn_torch']} / "
        f"{record.get('cudnn_backend')} frontend {record.get('cudnn_frontend')}")
    torch.backends.cuda.matmul.allow_tf32 = False
    for part, fn in (("attention", part_attention), ("conv", part_conv)):
        if part not in parts:
            continue
        t0 = time.time()
        try:
            fn(args, record)
        except Exception as exc:  # noqa: BLE001
            record[part + "_error"] = err_text(exc)
            traceback.print_exc()
        record[part + "_s"] = time.time() - t0
        write(record, args.out)
        log(f"part {part}: {record[part + '_s']:.1f} s")
    record["wall_s"] = time.time() - T_START
    write(record, args.out)
    print_tables(record)


if __name__ == "__main__":
    main()
