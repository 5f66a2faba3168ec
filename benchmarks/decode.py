"""End-to-end decode speed: a Llama-3-8B-shaped model against its MLA conversion (R=512, D=64), bf16.

Both models are random (speed does not depend on the values) and share every weight outside attention. Prefill
is skipped: the caches are filled with random values of the context length T, then one decode step (one new
token per sequence, the whole model with lm_head) is timed at that context.

- "graph": the step captured once into a CUDA graph and replayed (each replay writes the same cache slot and
  attends over T + 1 tokens). MLA uses its default LatentCache (in place); the original uses the same in-place
  cache with transformers' own SDPA decode path (no mask, GQA inside SDPA, fastest backend), which transformers
  would otherwise leave for a masked, head-repeating path while a graph is being captured.
- "eager": plain launches, the cache growing by one token per step: MLA with its LatentCache, the original with
  transformers' DynamicCache (its default) and StaticCache.

Also reported: KV-cache bytes per token, the largest context that fits at batch 1 and 32 (computed from free
memory, one point verified by allocation and a decode step), and the MLA decode kernel's bandwidth inside the
model's cache against the card's copy bandwidth.

    python benchmarks/decode.py [--quick] [--json out.json] [--md out.md]
"""

from __future__ import annotations

import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transmla.modeling.configuration_transmla import TransMLAConfig  # noqa: E402
from transmla.modeling.mla_decode import mla_decode_attention  # noqa: E402
from transmla.modeling.cache_transmla import LatentCache  # noqa: E402
from transmla.modeling.modeling_transmla import TransMLAForCausalLM  # noqa: E402

DTYPE = torch.bfloat16
GIB = 1 << 30
RESERVE = 2 * GIB  # activations, workspaces and allocator slack kept free besides the cache
SHAPE = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=131072, rope_theta=500000.0,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)
TINY = dict(SHAPE, vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096)
RANK, ROPE = 512, 64


# ---------------------------------------------------------------------------------------------------- models


_SDPA_BACKEND: list[Any] = [None]


def sdpa_gqa_attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                       scaling: float | None = None, **kwargs: Any):
    """transformers' SDPA decode path (no mask, GQA inside SDPA), pinned to the fastest backend found."""
    backend = _SDPA_BACKEND[0]
    with sdpa_kernel_ctx(backend):
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                             is_causal=attention_mask is None and query.shape[2] > 1,
                                             enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def sdpa_kernel_ctx(backend: Any):
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(backend)


AttentionInterface.register("sdpa_gqa_decode", sdpa_gqa_attention)


def build_models(shape: dict, device: torch.device) -> tuple[LlamaForCausalLM, TransMLAForCausalLM]:
    """The original (SDPA attention) and its MLA shape; the MLA model reuses every non-attention weight."""
    cfg = LlamaConfig(**shape)
    cfg._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        with torch.device(device):
            llama = LlamaForCausalLM(cfg).eval()
        small = shape["hidden_size"] < 1024
        mla_cfg = TransMLAConfig(**shape, kv_lora_rank=64 if small else RANK, qk_rope_head_dim=16 if small else ROPE)
        with torch.device("meta"):
            mla = TransMLAForCausalLM(mla_cfg).eval()
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for p in llama.parameters():
            p.requires_grad_(False)
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
        shared = dict(llama.named_parameters())
        for name, p in list(mla.named_parameters()):
            src = shared.get(name)
            if src is None or src.shape != p.shape:
                src = nn.Parameter(torch.empty(p.shape, device=device, dtype=DTYPE).normal_(0, 0.02), requires_grad=False)
            owner, leaf = name.rsplit(".", 1)
            setattr(mla.get_submodule(owner), leaf, src)
    return llama, mla


def param_bytes(model: nn.Module, exclude: set[int] = frozenset()) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in exclude)


def cache_kwarg(model: nn.Module) -> str:
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


# ---------------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def graph_step_ms(fn: Callable[[], Any], rewind: Callable[[], None], reps: int) -> float:
    """Milliseconds per step: fn captured into a CUDA graph, replayed `reps` times back to back."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
            rewind()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    rewind()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    del graph
    return start.elapsed_time(end) / reps


def eager_step_ms(fn: Callable[[], Any], steps: int, device: torch.device) -> float:
    """Milliseconds per step of plain launches (one warm-up step first)."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3 / steps


def fill(cache: Any, layers: int, keys: torch.Tensor, values: torch.Tensor) -> Any:
    for i in range(layers):
        cache.update(keys, values, i)
    return cache


def free_bytes(device: torch.device) -> int:
    """Device memory free for new tensors: free on the card plus what the allocator holds unused."""
    if device.type != "cuda":
        return 1 << 50
    return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- one shape


class Bench:
    def __init__(self, llama: LlamaForCausalLM, mla: TransMLAForCausalLM, device: torch.device, args: Any,
                 copy_bw: float | None) -> None:
        self.llama, self.mla, self.device, self.args, self.copy_bw = llama, mla, device, args, copy_bw
        self.lc, self.mc = llama.config, mla.config
        self.layers = self.lc.num_hidden_layers
        self.kv_heads, self.head_dim = self.lc.num_key_value_heads, self.lc.head_dim
        self.rank, self.rope = self.mc.kv_lora_rank[0], self.mc.qk_rope_head_dim
        self.item = torch.tensor([], dtype=DTYPE).element_size()
        self.orig_bpt = self.layers * 2 * self.kv_heads * self.head_dim * self.item
        self.mla_bpt = self.layers * (self.rank + self.rope) * self.item
        self.graphs = device.type == "cuda" and not args.no_graphs
        self.llama_kw, self.mla_kw = cache_kwarg(llama), cache_kwarg(mla)

    def inputs(self, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(3, self.lc.vocab_size, (B, 1), device=self.device)
        return ids, torch.full((B, 1), T, device=self.device, dtype=torch.long)

    def step(self, model: nn.Module, kw: str, cache: Any, B: int, T: int) -> Callable[[], Any]:
        ids, pos = self.inputs(B, T)
        return lambda: model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1, **{kw: cache}).logits

    def fits(self, need: int) -> bool:
        return need + RESERVE <= free_bytes(self.device)

    def run_mla(self, B: int, T: int, row: dict) -> None:
        need = B * (T + 64) * self.mla_bpt + B * T * (self.rank + self.rope) * self.item
        if not self.fits(need):
            row["mla_skip"] = f"needs {need / GIB:.1f} GiB"
            return
        lat = torch.randn(B, 1, T, self.rank, device=self.device, dtype=DTYPE)
        rope = torch.randn(B, 1, T, self.rope, device=self.device, dtype=DTYPE)
        cache = fill(LatentCache(self.mc, max_cache_len=T + 64), self.layers, lat, rope)
        del lat, rope
        fn = self.step(self.mla, self.mla_kw, cache, B, T)
        with torch.inference_mode():
            if self.graphs:
                try:
                    row["mla_graph_ms"] = graph_step_ms(fn, lambda: cache.crop(-1), self.args.reps)
                except Exception as exc:  # reported, and the eager numbers still come
                    row["mla_graph_error"] = repr(exc)[:200]
                    traceback.print_exc()
                cache.crop(T - cache.get_seq_length())
                row.update(self.kernel_bandwidth(cache, B, T))
            row["mla_eager_ms"] = eager_step_ms(fn, self.args.eager_steps, self.device)
        del cache, fn
        release(self.device)

    def kernel_bandwidth(self, cache: LatentCache, B: int, T: int) -> dict:
        """The decode kernel alone over the model's own cache buffers (one call per layer, so L2 does not help)."""
        from decode_kernel import graph_time

        H = self.mc.num_attention_heads
        q_lat = torch.randn(B, H, 1, self.rank, device=self.device, dtype=DTYPE) * self.rank**-0.25 * 2
        q_rope = torch.randn(B, H, 1, self.rope, device=self.device, dtype=DTYPE)
        scale = self.mc.head_dim**-0.5
        fns = [lambda layer=layer: mla_decode_attention(q_lat, q_rope, layer.keys[:, 0], layer.values[:, 0], None, scale)
               for layer in cache.layers]
        ms = graph_time(fns)
        nbytes = B * T * (self.rank + self.rope) * self.item
        return {"kernel_us": ms * 1e3, "kernel_GBps": nbytes / ms / 1e6, "kernel_frac": nbytes / (ms * 1e-3) / self.copy_bw}

    def sdpa_backend(self, cache: LatentCache, B: int, T: int) -> tuple[Any, float]:
        """Fastest SDPA backend (None: torch's own choice) for one GQA decode token over the original's cache, and
        its time per layer (ms; inf when none runs)."""
        from decode_kernel import graph_time
        from torch.nn.attention import SDPBackend

        q = torch.randn(B, self.lc.num_attention_heads, 1, self.head_dim, device=self.device, dtype=DTYPE)
        best, best_ms = None, math.inf
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, None):
            _SDPA_BACKEND[0] = backend
            fns = [lambda layer=layer: sdpa_gqa_attention(None, q, layer.keys, layer.values, None)
                   for layer in cache.layers]
            try:
                fns[0]()
                torch.cuda.synchronize()
                ms = graph_time(fns)
            except Exception:  # backend does not take these inputs
                continue
            if ms < best_ms:
                best, best_ms = backend, ms
        _SDPA_BACKEND[0] = best
        return best, best_ms

    def run_original(self, B: int, T: int, row: dict) -> None:
        layer_bytes = B * T * self.orig_bpt // self.layers
        if not self.fits(B * (T + 64) * self.orig_bpt + 2 * layer_bytes):
            row["orig_skip"] = f"needs {(B * T * self.orig_bpt + RESERVE) / GIB:.1f} GiB"
            return
        kv = torch.randn(B, self.kv_heads, T, self.head_dim, device=self.device, dtype=DTYPE)
        with torch.inference_mode():
            if self.graphs:  # in-place cache, transformers' unmasked SDPA decode path, fastest backend
                cache = fill(LatentCache(self.lc, max_cache_len=T + 64), self.layers, kv, kv)
                backend, attn_ms = self.sdpa_backend(cache, B, T)
                if attn_ms < math.inf:
                    nbytes = 2 * B * T * self.kv_heads * self.head_dim * self.item
                    name = backend.name.lower() if backend is not None else "default"
                    row.update(orig_sdpa_backend=name, orig_attn_us=attn_ms * 1e3,
                               orig_attn_frac=nbytes / (attn_ms * 1e-3) / self.copy_bw)
                    self.lc._attn_implementation = "sdpa_gqa_decode"
                    try:
                        fn = self.step(self.llama, self.llama_kw, cache, B, T)
                        row["orig_graph_ms"] = graph_step_ms(fn, lambda: cache.crop(-1), self.args.reps)
                    except Exception as exc:
                        row["orig_graph_error"] = repr(exc)[:200]
                        traceback.print_exc()
                    finally:
                        self.lc._attn_implementation = "sdpa"
                        fn = None
                del cache
                release(self.device)
            cache = fill(DynamicCache(config=self.lc), self.layers, kv, kv)
            row["orig_dynamic_eager_ms"] = eager_step_ms(self.step(self.llama, self.llama_kw, cache, B, T),
                                                         self.args.eager_steps, self.device)
            del cache
            release(self.device)
            release(self.device)
            # StaticCache attends over its whole buffer with a mask, which repeats K and V per query head
            repeat = self.lc.num_attention_heads // self.kv_heads * layer_bytes
            if not self.args.no_static and self.fits(B * (T + 64) * self.orig_bpt + layer_bytes + repeat):
                cache = fill(StaticCache(config=self.lc, max_cache_len=T + 8), self.layers, kv, kv)
                row["orig_static_eager_ms"] = eager_step_ms(self.step(self.llama, self.llama_kw, cache, B, T),
                                                            self.args.eager_steps, self.device)
                del cache
        del kv
        release(self.device)

    def shape(self, B: int, T: int) -> dict:
        row: dict[str, Any] = {"B": B, "T": T}
        self.run_mla(B, T, row)
        self.run_original(B, T, row)
        for key in [k for k in row if k.endswith("_ms")]:
            row[key.replace("_ms", "_tok_s")] = B / (row[key] * 1e-3)
        if "kernel_us" in row and "mla_graph_ms" in row:
            row["mla_attn_share"] = self.layers * row["kernel_us"] * 1e-3 / row["mla_graph_ms"]
        if "orig_attn_us" in row and "orig_graph_ms" in row:
            row["orig_attn_share"] = self.layers * row["orig_attn_us"] * 1e-3 / row["orig_graph_ms"]
        orig = [row[k] for k in ("orig_graph_tok_s", "orig_dynamic_eager_tok_s", "orig_static_eager_tok_s") if k in row]
        mla = [row[k] for k in ("mla_graph_tok_s", "mla_eager_tok_s") if k in row]
        if orig and mla:
            row["speedup_best"] = max(mla) / max(orig)
        if "mla_eager_tok_s" in row and "orig_dynamic_eager_tok_s" in row:
            row["speedup_eager_vs_dynamic"] = row["mla_eager_tok_s"] / row["orig_dynamic_eager_tok_s"]
        return row

    def max_context(self, verify_cap: int | None) -> dict:
        """Largest context per model alone at batch 1 and 32, and one MLA point checked by a real allocation."""
        free = free_bytes(self.device)
        mla_only = param_bytes(self.mla, exclude={id(p) for p in self.llama.parameters()})
        orig_only = param_bytes(self.llama, exclude={id(p) for p in self.mla.parameters()})
        out: dict[str, Any] = {"free_GiB_both_models": free / GIB, "reserve_GiB": RESERVE / GIB,
                               "weights_GiB": {"original": param_bytes(self.llama) / GIB,
                                               "mla": param_bytes(self.mla) / GIB}}
        for name, bpt, other in (("original", self.orig_bpt, mla_only), ("mla", self.mla_bpt, orig_only)):
            for B in (1, 32):
                out[f"{name}_B{B}"] = int((free + other - RESERVE) // (B * bpt))
        B = 32
        T = int((free - RESERVE) // (B * self.mla_bpt))
        if verify_cap:
            T = min(T, verify_cap)
        try:
            cache = LatentCache(self.mc, max_cache_len=T)
            tok = torch.randn(B, 1, 1, self.rank, device=self.device, dtype=DTYPE)
            tok_r = torch.randn(B, 1, 1, self.rope, device=self.device, dtype=DTYPE)
            fill(cache, self.layers, tok, tok_r)
            for layer in cache.layers:  # pretend the buffers hold T - 1 tokens (their contents do not matter)
                layer.length = T - 1
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            with torch.inference_mode():
                logits = self.step(self.mla, self.mla_kw, cache, B, T - 1)()
            sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / GIB if self.device.type == "cuda" else 0.0
            out["verified"] = {"model": "mla", "B": B, "T": T, "ok": bool(logits.shape[0] == B), "peak_GiB": peak}
            del cache, logits
        except torch.OutOfMemoryError as exc:
            out["verified"] = {"model": "mla", "B": B, "T": T, "ok": False, "error": str(exc)[:200]}
        release(self.device)
        return out


# ---------------------------------------------------------------------------------------------------- report


def fmt(row: dict, key: str, digits: int = 0) -> str:
    return f"{row[key]:.{digits}f}" if key in row else "-"


def markdown(payload: dict) -> str:
    env, mc = payload["env"], payload["max_context"]
    lines = [
        f"# Decode speed: Llama-3-8B shape vs MLA (R={RANK}, D={ROPE}), bf16",
        "",
        f"{env['device']}, copy bandwidth {env['copy_GBps']:.0f} GB/s (read + written); torch {env['torch']}, "
        f"transformers {env['transformers']}, triton {env['triton']}. Command: `{env['command']}`",
        "",
        "Random weights, caches filled with random values of context T, then one token per sequence per step. "
        "graph: the step as one CUDA graph (both models; the original with an in-place cache and transformers' "
        "unmasked SDPA GQA decode path on the fastest SDPA backend). eager: plain launches; the original with "
        "transformers' DynamicCache and StaticCache. Speedup: best MLA / best original.",
        "",
        f"KV cache per token: original {payload['bytes_per_token']['original']} B, MLA "
        f"{payload['bytes_per_token']['mla']} B ({payload['bytes_per_token']['ratio']:.2f}x smaller).",
        "",
        "| B | T | MLA graph tok/s | orig graph tok/s | speedup | MLA eager tok/s | orig DynamicCache tok/s | "
        "orig StaticCache tok/s | MLA kernel us | kernel % copy BW | MLA attn share of step | "
        "orig attn us (backend) | orig attn % BW | orig attn share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["results"]:
        orig_g = fmt(r, "orig_graph_tok_s") if "orig_skip" not in r else f"does not fit ({r['orig_skip']})"
        mla_g = fmt(r, "mla_graph_tok_s") if "mla_skip" not in r else f"does not fit ({r['mla_skip']})"
        frac = f"{r['kernel_frac']:.0%}" if "kernel_frac" in r else "-"
        attn = f"{r['orig_attn_us']:.0f} ({r['orig_sdpa_backend']})" if "orig_attn_us" in r else "-"
        afrac = f"{r['orig_attn_frac']:.0%}" if "orig_attn_frac" in r else "-"
        speed = f"{r['speedup_best']:.2f}x" if "speedup_best" in r else "-"
        share = {k: f"{r[k]:.0%}" if k in r else "-" for k in ("mla_attn_share", "orig_attn_share")}
        lines.append(f"| {r['B']} | {r['T']} | {mla_g} | {orig_g} | {speed} | {fmt(r, 'mla_eager_tok_s')} | "
                     f"{fmt(r, 'orig_dynamic_eager_tok_s')} | {fmt(r, 'orig_static_eager_tok_s')} | "
                     f"{fmt(r, 'kernel_us', 1)} | {frac} | {share['mla_attn_share']} | {attn} | {afrac} | "
                     f"{share['orig_attn_share']} |")
    v = mc["verified"]
    lines += [
        "",
        f"Largest context that fits (each model alone; memory free with both resident {mc['free_GiB_both_models']:.1f} "
        f"GiB, {mc['reserve_GiB']:.0f} GiB kept for activations; weights original {mc['weights_GiB']['original']:.1f} "
        f"GiB, MLA {mc['weights_GiB']['mla']:.1f} GiB):",
        "",
        "| batch | original | MLA | ratio |",
        "|---|---|---|---|",
    ]
    for B in (1, 32):
        o, m = mc[f"original_B{B}"], mc[f"mla_B{B}"]
        lines.append(f"| {B} | {o} | {m} | {m / max(o, 1):.2f}x |")
    lines += ["", f"Verified by allocation: MLA, batch {v['B']}, a {v['T']}-token cache allocated and one decode step "
              f"run with both models resident: {'ok' if v['ok'] else 'FAILED ' + v.get('error', '')}"
              + (f", peak {v['peak_GiB']:.1f} GiB allocated." if v.get("peak_GiB") else "."), ""]
    for goal in payload["goals"]:
        lines.append(f"- {goal}")
    return "\n".join(lines) + "\n"


def goals(payload: dict) -> list[str]:
    out = []
    row = next((r for r in payload["results"] if r["B"] == 16 and r["T"] == 16384), None)
    if row and "speedup_best" in row:
        out.append(f"batch 16, 16K: MLA {row['speedup_best']:.2f}x the original's best tokens/s "
                   f"({'met' if row['speedup_best'] >= 1.8 else 'NOT met'}, goal 1.8x)")
    mc = payload["max_context"]
    ratio = min(mc["mla_B1"] / max(1, mc["original_B1"]), mc["mla_B32"] / max(1, mc["original_B32"]))
    out.append(f"largest context {ratio:.2f}x the original's ({'met' if ratio >= 3 else 'NOT met'}, goal 3x)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 1 and 16 at 4K only: a smoke run")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (runs on CPU too, eager only)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--reps", type=int, default=20, help="graph replays timed per shape")
    ap.add_argument("--eager-steps", type=int, default=3)
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--no-static", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None, help="write the markdown report here")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.contexts, args.reps = [1, 16], [4096], 5
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        args.batches, args.contexts = [b for b in args.batches if b <= 8][:2], [128]
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message=".*(kernel not used|runtime disabled|same num_heads|Flash attention|"
                            "Memory efficient|CuDNN attention|Torch was not compiled).*")

    copy_bw = None
    name = platform.processor() or "cpu"
    if device.type == "cuda":
        from decode_kernel import copy_bandwidth

        copy_bw = copy_bandwidth()
        name = torch.cuda.get_device_name(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    env = {"device": name, "copy_GBps": (copy_bw or 0) / 1e9, "torch": torch.__version__,
           "transformers": transformers.__version__, "triton": triton_version,
           "command": "python benchmarks/decode.py " + " ".join(sys.argv[1:])}
    print(f"{env['device']}: copy {env['copy_GBps']:.0f} GB/s; torch {env['torch']}, transformers "
          f"{env['transformers']}, triton {env['triton']}", flush=True)

    t0 = time.perf_counter()
    llama, mla = build_models(TINY if args.tiny else SHAPE, device)
    bench = Bench(llama, mla, device, args, copy_bw or 1.0)
    print(f"models built in {time.perf_counter() - t0:.1f} s; free {free_bytes(device) / GIB:.1f} GiB", flush=True)
    max_context = bench.max_context(8192 if (args.quick or args.tiny) else None)
    print(f"max context: {max_context}", flush=True)

    results = []
    for T in args.contexts:
        for B in args.batches:
            t0 = time.perf_counter()
            try:
                row = bench.shape(B, T)
            except Exception as exc:  # one shape failing leaves the others
                traceback.print_exc()
                row = {"B": B, "T": T, "error": repr(exc)[:200]}
            release(device)
            results.append(row)
            print(f"[{free_bytes(device) / GIB:.1f} GiB free] B={B} T={T} ({time.perf_counter() - t0:.1f} s): " + ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                if k not in ("B", "T") and not k.endswith("_ms")), flush=True)

    payload = {
        "env": env,
        "shape": {"original": {k: SHAPE[k] for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                                      "head_dim")}, "R": RANK, "D": ROPE, "dtype": "bf16"},
        "bytes_per_token": {"original": bench.orig_bpt, "mla": bench.mla_bpt, "ratio": bench.orig_bpt / bench.mla_bpt},
        "results": results,
        "max_context": max_context,
    }
    payload["goals"] = goals(payload)
    report = markdown(payload)
    print()
    print(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1, default=str))
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(report)


if __name__ == "__main__":
    main()
