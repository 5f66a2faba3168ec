"""Benchmark the absorbed MLA decode kernel against einsum decode and SDPA over the original GQA cache.

Shape: one Llama-3-8B-like layer (32 query heads, 8 KV heads of width 128) converted to MLA with latent
width R=512 and RoPE width D=64, bf16, one new token per sequence. Needs a CUDA GPU and triton.

Times are device time per call: each measured call is captured into a CUDA graph, once per input set,
with enough input sets that together they overflow the L2, and the graph is replayed. Bandwidth counts
the bytes the attention must read: B*T*(R+D)*2 for MLA, 2*B*8*T*128*2 for the GQA K and V caches.

    python benchmarks/decode_kernel.py [--json out.json] [--sweep] [--profile]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transmla.modeling.mla_decode import (  # noqa: E402
    _choose_splits,
    _kernel_config,
    _mla_decode_triton,
    mla_decode_attention,
    mla_decode_reference,
    triton_available,
)

H, G, HEAD_DIM, R, D = 32, 8, 128, 512, 64
DTYPE = torch.bfloat16


def bench(fn, rep_ms: int = 60) -> float:
    """Median time of fn in milliseconds (L2 flushed before every call), launch overhead included."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=rep_ms, return_mode="median"))


def rotations(set_bytes: int) -> int:
    """How many input sets to cycle through so that together they overflow the L2 several times."""
    return max(2, min(64, math.ceil((256 << 20) / max(1, set_bytes))))


def graph_time(fns: list, reps: int = 15) -> float:
    """Device time per call in milliseconds: fns (one per input set) captured once into a CUDA graph, replayed.

    Falls back to do_bench on the first function when the calls cannot be captured.
    """
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for f in fns:
                f()
        graph.replay()
        torch.cuda.synchronize()
    except Exception as exc:  # not capturable: time plain launches
        print(f"  (no CUDA graph: {exc!r:.100}; timing plain launches)", flush=True)
        return bench(fns[0])
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(fns))
    del graph
    return sorted(times)[len(times) // 2]


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), rep_ms=200)
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


def einsum_decode(q_lat, q_rope, latent, k_rope, scale: float) -> torch.Tensor:
    """Plain absorbed decode: bf16 matmuls, float32 softmax."""
    s = torch.einsum("bhqr,btr->bhqt", q_lat, latent).float()
    s = s + torch.einsum("bhqd,btd->bhqt", q_rope, k_rope).float()
    p = torch.softmax(s * scale, dim=-1).to(latent.dtype)
    return torch.einsum("bhqt,btr->bhqr", p, latent)


def sdpa_time(B: int, T: int) -> tuple[float, str]:
    """Fastest SDPA backend for one decode token over the original [B, G, T, 128] K and V caches."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    warnings.filterwarnings("ignore", message=".*(kernel not used|runtime disabled|same num_heads).*")
    n = rotations(2 * B * G * T * HEAD_DIM * 2)
    sets = [
        (
            torch.randn(B, H, 1, HEAD_DIM, device="cuda", dtype=DTYPE),
            torch.randn(B, G, T, HEAD_DIM, device="cuda", dtype=DTYPE),
            torch.randn(B, G, T, HEAD_DIM, device="cuda", dtype=DTYPE),
        )
        for _ in range(n)
    ]
    best, name = math.inf, "none"
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):

        def run(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        try:
            run(*sets[0])
            torch.cuda.synchronize()
        except Exception:  # backend does not support this input
            continue
        ms = graph_time([lambda x=x: run(*x) for x in sets])
        if ms < best:
            best, name = ms, backend.name.lower()
    if best == math.inf:  # no fused backend took GQA: expand the heads (outside the timed region)
        q, k, v = sets[0]
        k, v = k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1)
        best, name = bench(lambda: F.scaled_dot_product_attention(q, k, v)), "default+repeat"
    return best, name


def max_rel_error(q_lat, q_rope, latent, k_rope, out, scale: float) -> float:
    """Relative error of out against the float32 reference, one sequence at a time to bound memory."""
    num = den = 0.0
    for b in range(q_lat.shape[0]):
        ref = mla_decode_reference(
            q_lat[b : b + 1].float(), q_rope[b : b + 1].float(), latent[b : b + 1].float(), k_rope[b : b + 1].float(),
            None, scale,
        )
        num += (out[b : b + 1].float() - ref).pow(2).sum().item()
        den += ref.pow(2).sum().item()
    return math.sqrt(num / max(den, 1e-30))


# (BLOCK_T, num_warps, num_stages, BLOCK_H)
SWEEP_CONFIGS = [(64, 4, 3, 32), (64, 4, 2, 16), (64, 4, 3, 16), (32, 4, 3, 16), (64, 8, 3, 32)]


def sweep(sets: list, scale: float, B: int, T: int) -> list[dict]:
    """Time the kernel over block/warp/stage configurations and split counts."""
    rows = []
    for bt, nw, ns, bh in SWEEP_CONFIGS:
        for splits in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            if splits * bt > T or B * splits > 8 * 132 or B * splits * (H // bh) < 16:
                continue
            cfg = {"block_t": bt, "warps": nw, "stages": ns, "block_h": bh, "splits": splits}
            try:
                fns = [
                    lambda x=x: _mla_decode_triton(
                        *x, None, scale, num_splits=splits, block_t=bt, num_warps=nw, num_stages=ns, block_h=bh
                    )
                    for x in sets
                ]
                fns[0]()
                torch.cuda.synchronize()
                cfg["ms"] = graph_time(fns, reps=7)
            except Exception as exc:  # e.g. out of shared memory for this configuration
                cfg["error"] = str(exc)[:120]
                rows.append(cfg)
                break
            rows.append(cfg)
    return rows


def kernel_breakdown(fn, iters: int = 20) -> dict[str, float]:
    """Average device time per kernel name (microseconds) over iters calls, L2 flushed between calls."""
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        if "mla_decode" in ev.key:
            out[ev.key] = ev.device_time_total / iters
    return out


def compiled_info() -> list[str]:
    """Registers, spills and shared memory of every compiled variant of the kernels."""
    from transmla.modeling import mla_decode as m

    lines = []
    for fn in (m._mla_decode_split_kernel, m._mla_decode_combine_kernel):
        try:
            for cache in fn.device_caches.values():
                for key, k in cache[0].items():
                    k._init_handles()
                    lines.append(f"{fn.__name__}: regs={k.n_regs} spills={k.n_spills} "
                                 f"shared={k.metadata.shared} warps={k.metadata.num_warps} "
                                 f"stages={k.metadata.num_stages}")
        except Exception as exc:  # the cache layout differs between triton versions
            lines.append(f"{fn.__name__}: no info ({exc!r:.80})")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--sweep", action="store_true", help="also sweep kernel configurations and split counts")
    ap.add_argument("--profile", action="store_true", help="print the time of each kernel of the decode")
    ap.add_argument("--no-sdpa", action="store_true")
    args = ap.parse_args()
    if not triton_available():
        sys.exit("needs a CUDA GPU and triton")

    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    copy_bw = copy_bandwidth()
    print(f"device: {props.name}, {props.multi_processor_count} SMs; copy bandwidth {copy_bw / 1e9:.0f} GB/s "
          f"(read + written)", flush=True)

    scale = HEAD_DIM**-0.5
    results, sweeps = [], {}
    for T in args.contexts:
        for B in args.batches:
            nbytes = B * T * (R + D) * 2
            n = rotations(nbytes)
            sdpa_bytes = rotations(4 * B * G * T * HEAD_DIM) * 4 * B * G * T * HEAD_DIM
            if max(n * nbytes, 0 if args.no_sdpa else sdpa_bytes) > 0.8 * torch.cuda.mem_get_info()[0]:
                print(f"skip B={B} T={T}: does not fit", flush=True)
                continue
            sets = [
                (
                    torch.randn(B, H, 1, R, device="cuda", dtype=DTYPE) * R**-0.25 * 2,
                    torch.randn(B, H, 1, D, device="cuda", dtype=DTYPE),
                    torch.randn(B, T, R, device="cuda", dtype=DTYPE) * R**-0.25,
                    torch.randn(B, T, D, device="cuda", dtype=DTYPE),
                )
                for _ in range(n)
            ]
            out = mla_decode_attention(*sets[0], None, scale)
            err = max_rel_error(*sets[0], out, scale)
            t_k = graph_time([lambda x=x: mla_decode_attention(*x, None, scale) for x in sets])
            t_e = graph_time([lambda x=x: einsum_decode(*x, scale) for x in sets])
            block_h, block_t = _kernel_config(H, R, B, props.multi_processor_count)[:2]
            splits = _choose_splits(T, B * math.ceil(H / block_h), props.multi_processor_count, block_t)
            per_split = math.ceil(math.ceil(T / splits) / block_t) * block_t
            row = {
                "B": B, "T": T, "block_h": block_h, "splits": math.ceil(T / per_split), "mla_cache_MB": nbytes / 1e6,
                "kernel_us": t_k * 1e3, "kernel_GBps": nbytes / t_k / 1e6,
                "kernel_frac": nbytes / (t_k * 1e-3) / copy_bw,
                "einsum_us": t_e * 1e3, "einsum_frac": nbytes / (t_e * 1e-3) / copy_bw,
                "rel_err": err,
            }
            if args.profile:
                row["kernels_us"] = kernel_breakdown(lambda: mla_decode_attention(*sets[0], None, scale))
                print(f"  kernels B={B} T={T}: " + ", ".join(f"{k} {v:.1f} us" for k, v in row["kernels_us"].items()),
                      flush=True)
            if args.sweep:
                sw = sweep(sets, scale, B, T)
                sweeps[f"{B}x{T}"] = sw
                best = min((r for r in sw if "ms" in r), key=lambda r: r["ms"])
                row["sweep_best"] = best
                per_cfg = {}
                for r in sw:
                    key = (r["block_t"], r["warps"], r["stages"], r["block_h"])
                    if "ms" in r and (key not in per_cfg or r["ms"] < per_cfg[key][1]):
                        per_cfg[key] = (r["splits"], r["ms"])
                print(f"  sweep B={B} T={T}: " + "; ".join(
                    f"{k}: S={v[0]} {nbytes / (v[1] * 1e-3) / copy_bw:.0%}" for k, v in per_cfg.items()), flush=True)
            del sets, out
            torch.cuda.empty_cache()
            if not args.no_sdpa:
                t_s, backend = sdpa_time(B, T)
                row.update({"sdpa_us": t_s * 1e3, "sdpa_backend": backend,
                            "sdpa_GBps": 2 * B * G * T * HEAD_DIM * 2 / t_s / 1e6, "speedup_vs_sdpa": t_s / t_k})
                torch.cuda.empty_cache()
            results.append(row)
            print(f"B={B} T={T}: kernel {row['kernel_us']:.1f} us ({row['kernel_frac']:.0%}), "
                  f"einsum {row['einsum_us']:.1f} us, err {err:.1e}", flush=True)

    if args.profile:
        print("\n".join(compiled_info()))
    print()
    print(f"{props.name}, copy bandwidth {copy_bw / 1e9:.0f} GB/s; H={H}, R={R}, D={D}, bf16, one query token; "
          "device time per call from CUDA-graph replays over input sets that overflow the L2")
    print()
    print("| B | T | BLOCK_H x splits | MLA cache MB | kernel us | kernel GB/s | % of copy BW | einsum us | einsum % | "
          "SDPA GQA us | SDPA GB/s | speedup vs SDPA | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        sd = (f"{r['sdpa_us']:.1f} | {r['sdpa_GBps']:.0f} | {r['speedup_vs_sdpa']:.2f}x" if "sdpa_us" in r
              else "- | - | -")
        print(f"| {r['B']} | {r['T']} | {r['block_h']} x {r['splits']} | {r['mla_cache_MB']:.1f} | "
              f"{r['kernel_us']:.1f} | "
              f"{r['kernel_GBps']:.0f} | {r['kernel_frac']:.0%} | {r['einsum_us']:.1f} | {r['einsum_frac']:.0%} | "
              f"{sd} | {r['rel_err']:.1e} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"device": props.name, "sms": props.multi_processor_count, "copy_GBps": copy_bw / 1e9,
                   "shape": {"H": H, "G": G, "head_dim": HEAD_DIM, "R": R, "D": D, "dtype": "bf16"},
                   "results": results, "sweeps": sweeps}
        args.json.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
