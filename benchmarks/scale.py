"""Scale benchmark: convert a random Llama-3-8B-shaped checkpoint and measure peak memory and wall time.

The source (32 layers, hidden 4096, MLP 14336, 32 query / 8 KV heads of 128, vocab 128256, llama3 RoPE scaling,
bf16, about 16 GB) is written one shard per decoder layer with safetensors' `save_file`, so it never exists whole
in memory. It is then converted (weights-only SVD, R=512, D=64) by `python -m transmla.cli convert` in a child
process, whose peak resident memory is the kernel's high-water mark (`wait4` rusage, as `/usr/bin/time -v`
reports it) and, split into anonymous and file-backed (memory-mapped source) pages, a poll of /proc.

    python benchmarks/scale.py                       # the full 8B shape on the CPU
    python benchmarks/scale.py --layers 2            # a quick check
    python benchmarks/scale.py --device cuda --workdir /tmp/scale
    python benchmarks/scale.py --device cuda --method whiten --calib-file wikitext2-valid.txt   # 128 x 2048 tokens

Rows are collected in benchmarks/results/scale.json and rendered to benchmarks/results/scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
GIB = 2**30
MEMORY_GOAL_GIB = 4.0  # peak resident memory allowed beyond one decoder layer's weights (CPU)
GPU_TIME_GOAL_S = 120.0
CALIBRATED_GOAL_S = 600.0

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "torch_dtype": "bfloat16",
}


# -- the source checkpoint ----------------------------------------------------------------------------------


def layer_shapes(config: dict, layer: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of one decoder layer's tensors."""
    h, i = config["hidden_size"], config["intermediate_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    p = f"model.layers.{layer}."
    return {
        p + "input_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (q, h),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.o_proj.weight": (h, q),
        p + "post_attention_layernorm.weight": (h,),
        p + "mlp.gate_proj.weight": (i, h),
        p + "mlp.up_proj.weight": (i, h),
        p + "mlp.down_proj.weight": (h, i),
    }


def shard_plan(config: dict) -> list[dict[str, tuple[int, ...]]]:
    """One shard for the embeddings, one per decoder layer, one for the final norm and lm_head."""
    h, v = config["hidden_size"], config["vocab_size"]
    shards = [{"model.embed_tokens.weight": (v, h)}]
    shards += [layer_shapes(config, layer) for layer in range(config["num_hidden_layers"])]
    shards.append({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return shards


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator, device: str) -> torch.Tensor:
    """bf16 weights like an initialised model: N(0, 0.02) matrices, norms of ones."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0.0, 0.02, generator=generator)
    return out.cpu()


def byte_tokenizer():
    """A small offline tokenizer (one token per byte), enough for a complete model folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="\x01", eos_token="\x02")


def build_source(folder: Path, layers: int, device: str, seed: int = 0) -> dict:
    """Write the random checkpoint shard by shard (skipped if `folder` already holds the same one)."""
    config = dict(LLAMA3_8B, num_hidden_layers=layers)
    marker = folder / "benchmark-source.json"
    if marker.is_file() and json.loads(marker.read_text()).get("config") == config:
        return json.loads(marker.read_text())
    from safetensors.torch import save_file

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(seed)
    plan = shard_plan(config)
    weight_map, total = {}, 0
    for index, shapes in enumerate(plan, start=1):
        name = f"model-{index:05d}-of-{len(plan):05d}.safetensors"
        shard = {key: random_tensor(key, shape, generator, device) for key, shape in shapes.items()}
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in shard.values())
        weight_map.update(dict.fromkeys(shard, name))
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    byte_tokenizer().save_pretrained(folder)
    info = {"config": config, "bytes": total, "params": total // 2, "build_s": time.perf_counter() - start,
            "layer_bytes": 2 * sum(numel(s) for s in layer_shapes(config, 0).values())}
    marker.write_text(json.dumps(info, indent=2) + "\n")
    return info


# -- the measured conversion --------------------------------------------------------------------------------


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


class MemoryPoller(threading.Thread):
    """Peak resident memory of a process (total, anonymous, file-backed), polled from /proc/PID/status."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for field in self.peak:
                self.peak[field] = max(self.peak[field], _status_kib(self.pid, field))
            self.stop.wait(self.interval)


@dataclass
class Result:
    device: str
    device_name: str
    layers: int
    params_b: float
    source_gib: float
    output_gib: float
    build_s: float
    convert_s: float
    peak_rss_gib: float
    peak_anon_gib: float
    peak_file_gib: float
    layer_gib: float
    command: str
    method: str = "svd"

    @property
    def beyond_layer_gib(self) -> float:
        return self.peak_rss_gib - self.layer_gib


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return f"{platform.processor() or 'CPU'} ({os.cpu_count()} cores)"


def convert_measured(src: Path, out: Path, device: str, rank: int, rope_dim: int, log: Path,
                     calibration: list[str]) -> tuple[float, dict, int]:
    """Run the CLI conversion in a child; (wall seconds, peaks in KiB, kernel max RSS in KiB)."""
    cmd = [sys.executable, "-m", "transmla.cli", "convert", str(src), "--out", str(out),
           "-r", str(rank), "-d", str(rope_dim), "--device", device, "--overwrite", *calibration]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with log.open("w") as sink:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        poller = MemoryPoller(proc.pid)
        poller.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        poller.stop.set()
        poller.join()
    if proc.returncode != 0:
        raise SystemExit(f"conversion failed (exit {proc.returncode}):\n{log.read_text()[-4000:]}")
    return wall, poller.peak, usage.ru_maxrss


def check_output(out: Path, layers: int, rank: int, rope_dim: int) -> int:
    """Header-only check that every layer was converted; returns the output's weight bytes."""
    from transmla.io import SafetensorsSource

    with SafetensorsSource(out) as tensors:
        for layer in range(layers):
            shape = tensors.shape(f"model.layers.{layer}.self_attn.kv_a_proj.weight")
            assert shape == (rank + rope_dim, LLAMA3_8B["hidden_size"]), shape
        return json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"] \
            if (out / "model.safetensors.index.json").is_file() else (out / "model.safetensors").stat().st_size


# -- reporting ----------------------------------------------------------------------------------------------

COLUMNS = ("device", "method", "layers", "params", "source", "output", "build", "convert wall", "peak RSS",
           "of which anon / file", "one layer", "peak - layer")


def row(r: Result) -> list[str]:
    return [f"{r.device_name} (`{r.device}`)", r.method, str(r.layers), f"{r.params_b:.2f} B", f"{r.source_gib:.1f} GiB",
            f"{r.output_gib:.1f} GiB", f"{r.build_s:.0f} s", f"{r.convert_s:.1f} s", f"{r.peak_rss_gib:.2f} GiB",
            f"{r.peak_anon_gib:.2f} / {r.peak_file_gib:.2f} GiB", f"{r.layer_gib:.2f} GiB",
            f"{r.beyond_layer_gib:.2f} GiB"]


def markdown(results: list[Result]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(r)) + " |" for r in results]
    return "\n".join(lines)


def load(store: Path) -> list[Result]:
    return [Result(**r) for r in json.loads(store.read_text())] if store.is_file() else []


def save(results: list[Result], folder: Path) -> None:
    """Add (or replace) rows, one per device and depth, and re-render the markdown page."""
    folder.mkdir(parents=True, exist_ok=True)
    store = folder / "scale.json"
    key = lambda r: (r.device_name, r.device, r.layers, r.method)  # noqa: E731
    rows = [r for r in load(store) if key(r) not in {key(n) for n in results}] + results
    rows.sort(key=lambda r: (r.device != "cpu", -r.layers, r.device_name))
    store.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    page = [
        "# Scale: converting a Llama-3-8B-shaped checkpoint (R=512, D=64)",
        "",
        "Random bf16 weights of the Llama-3-8B shape (`--layers` shrinks the depth), converted by "
        "`python -m transmla.cli convert SRC --out OUT --method METHOD -r 512 -d 64 --device DEVICE` in a child process "
        "(`whiten`: calibrated on 128 x 2048 tokens of the WikiText-2 validation text). "
        "Peak RSS is the child's kernel high-water mark (`wait4`); anonymous / file-backed (memory-mapped source pages) "
        f"peaks are polled from /proc. Goals: peak RSS at most {MEMORY_GOAL_GIB:.0f} GiB beyond one layer's weights on "
        f"the CPU; under {GPU_TIME_GOAL_S:.0f} s on an H100 for `svd`, under {CALIBRATED_GOAL_S / 60:.0f} minutes calibrated. Reproduce with `python benchmarks/scale.py [--device cuda]`.",
        "",
        markdown(rows),
        "",
        "Commands: " + "; ".join(sorted({f"`{r.command}`" for r in rows})),
        "",
        "Wall time is the whole command: start-up, the checks, reading, the per-layer math, writing and syncing the "
        "output. On the CPU it is dominated by each layer's float64 SVD of the stacked key/value rows "
        "([G*d - D + G*d, hidden] = [1984, 4096] here); memory does not grow with depth (the source is memory-mapped "
        "and unmapped after every layer, and shards are streamed to disk tensor by tensor).",
        "",
    ]
    (folder / "scale.md").write_text("\n".join(page))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32: the full 8B shape)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/transmla-scale"))
    parser.add_argument("--device", default="cpu", help="where the conversion math runs: cpu, cuda, cuda:N")
    parser.add_argument("--build-device", default=None, help="where random weights are drawn [default: --device]")
    parser.add_argument("--rank", type=int, default=512)
    parser.add_argument("--rope-dim", type=int, default=64)
    parser.add_argument("--method", default="svd", choices=["svd", "pca", "whiten"])
    parser.add_argument("--calib-file", type=Path, help="calibration text for pca/whiten")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seq-len", type=int, default=2048)
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of scale.json / scale.md")
    parser.add_argument("--no-save", action="store_true", help="do not record the result")
    parser.add_argument("--keep", action="store_true", help="keep the converted output (the source is always kept)")
    parser.add_argument("--import-json", type=Path, help="only add the rows of another scale.json (e.g. from a GPU host)")
    args = parser.parse_args(argv)
    if args.import_json:
        save(load(args.import_json), args.results)
        print(markdown(load(args.results / "scale.json")))
        return

    src, out = args.workdir / f"src-{args.layers}", args.workdir / f"mla-{args.layers}"
    info = build_source(src, args.layers, args.build_device or args.device)
    calibration = ["--method", args.method]
    if args.method != "svd":
        if args.calib_file is None:
            parser.error(f"--method {args.method} needs --calib-file")
        calibration += ["--calib-file", str(args.calib_file.resolve()), "--calib-samples", str(args.calib_samples),
                        "--calib-seq-len", str(args.calib_seq_len)]
    wall, peaks, maxrss_kib = convert_measured(src, out, args.device, args.rank, args.rope_dim,
                                               args.workdir / "convert.log", calibration)
    output_bytes = check_output(out, args.layers, args.rank, args.rope_dim)
    if not args.keep:
        shutil.rmtree(out)
    command = f"python benchmarks/scale.py --layers {args.layers} --device {args.device}"
    if args.method != "svd":
        command += (f" --method {args.method} --calib-file {args.calib_file.name} --calib-samples {args.calib_samples}"
                    f" --calib-seq-len {args.calib_seq_len}")
    result = Result(
        device=args.device, device_name=device_name(args.device), layers=args.layers,
        params_b=info["params"] / 1e9, source_gib=info["bytes"] / GIB, output_gib=output_bytes / GIB,
        build_s=info["build_s"], convert_s=wall, peak_rss_gib=maxrss_kib / 2**20,
        peak_anon_gib=peaks["RssAnon"] / 2**20, peak_file_gib=peaks["RssFile"] / 2**20,
        layer_gib=info["layer_bytes"] / GIB, command=command, method=args.method,
    )
    if not args.no_save:
        save([result], args.results)
    if args.json:
        print(json.dumps(asdict(result) | {"beyond_layer_gib": result.beyond_layer_gib}, indent=2))
    else:
        print(markdown([result]))


if __name__ == "__main__":
    main()
