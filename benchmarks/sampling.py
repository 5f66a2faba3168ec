"""Sampling speed: the fixed-shape sampler (`transmla.data.sampling`) against a plain transformers decode loop,
side by side in one run, on SmolLM2-135M (or --model).

The plain loop is what the sampler replaced: DynamicCache, the model's own attention, one `torch.multinomial`
draw per step (a host synchronisation), the same top-p nucleus. Both sample `--count` rows of `--seq-len`
tokens per batch size from the start token. Also checked: the same seed draws the same tokens twice.

    python benchmarks/sampling.py --device cuda --batches 64 1024 --out benchmarks/results
    python benchmarks/sampling.py --batches 16 --seq-len 128          # CPU

Writes sampling.json and sampling.md under --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transmla.data.sampling import NUCLEUS_CANDIDATES, TOP_P, device_name, sample_windows  # noqa: E402
from transmla.io.source import open_source  # noqa: E402


@torch.inference_mode()
def plain_loop(model, rows: int, seq_len: int, seed: int) -> torch.Tensor:
    """The baseline: a transformers decode loop with DynamicCache and torch.multinomial."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = [torch.full((rows, 1), model.config.bos_token_id, dtype=torch.long, device=device)]
    cache = DynamicCache()
    for _ in range(seq_len - 1):
        logits = model(input_ids=tokens[-1], use_cache=True, logits_to_keep=1, past_key_values=cache).logits[:, -1]
        probs = logits.float().softmax(-1)
        top, index = probs.topk(NUCLEUS_CANDIDATES, dim=-1)
        top = top * ((top.cumsum(-1) - top) < TOP_P)
        tokens.append(index.gather(-1, torch.multinomial(top, 1, generator=generator)))
    return torch.cat(tokens, 1).cpu()


def timed(fn) -> tuple[float, torch.Tensor]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    began = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - began, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", nargs="+", type=int, default=[16])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--plain-steps", type=int, default=128, help="decode steps of the plain loop (it is slow)")
    parser.add_argument("--model-name", help="how the report names the model [default: --model]")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--render-only", action="store_true", help="rewrite sampling.md from sampling.json")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        return render(json.loads((args.out / "sampling.json").read_text()), args.out)
    source = open_source(args.model)
    model = source.load_model(torch.bfloat16, args.device)
    device = torch.device(args.device)
    rows_out = []
    for batch in args.batches:
        sample_windows(model, batch, 2 * 128 + 8, seed=1, rows=batch)  # warm-up: kernels, graphs of two spans
        ours_s, ours = timed(lambda: sample_windows(model, batch, args.seq_len, seed=0, rows=batch))
        again = sample_windows(model, batch, args.seq_len, seed=0, rows=batch)
        steps = min(args.plain_steps, args.seq_len)
        plain_loop(model, batch, 8, seed=0)
        plain_s, _ = timed(lambda: plain_loop(model, batch, steps, seed=0))
        row = {"batch": batch, "seq_len": args.seq_len, "ours_tokens_per_s": batch * args.seq_len / ours_s,
               "plain_tokens_per_s": batch * steps / plain_s, "plain_steps": steps,
               "repeatable": bool(torch.equal(ours, again)), "seconds": ours_s}
        row["speedup"] = row["ours_tokens_per_s"] / row["plain_tokens_per_s"]
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    command = (f"python benchmarks/sampling.py --device {args.device} --batches {' '.join(map(str, args.batches))} "
               f"--seq-len {args.seq_len} --out {args.out}" + ("" if args.model == "smollm2-135m" else f" --model {args.model}"))
    record = {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
              "model": args.model_name or args.model, "command": command, "rows": rows_out}
    (args.out / "sampling.json").write_text(json.dumps(record, indent=1) + "\n")
    render(record, args.out)


def render(record: dict, out: Path) -> None:
    rows_out = record["rows"]
    seq_len = rows_out[0]["seq_len"]
    lines = [f"# Sampling speed: {record['model']} on {record['device']}", "",
             f"Tokens per second sampling {seq_len}-token rows from the start token (bf16, top-p {TOP_P}); the plain "
             f"loop (transformers DynamicCache, torch.multinomial) timed over its first steps, which are its fastest.",
             "", "| rows at once | ours tok/s | plain loop tok/s | speedup | same tokens twice |", "| ---: | ---: | ---: | ---: | --- |"]
    for r in rows_out:
        lines.append(f"| {r['batch']} | {r['ours_tokens_per_s']:,.0f} | {r['plain_tokens_per_s']:,.0f} | "
                     f"{r['speedup']:.1f}x | {'yes' if r['repeatable'] else 'NO'} |")
    lines += ["", f"Command: `{record['command']}` (torch {record['torch']})", ""]
    (out / "sampling.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
