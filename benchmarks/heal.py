"""Healing benchmark: SmolLM2-135M converted to 50% and 25% of its KV cache, healed for a few token budgets.

Reports WikiText-2 test perplexity (all 2048-token windows) of the original, the converted and the healed models,
the share of the perplexity gap that healing recovers and the wall time, as a markdown table, JSON and a PNG of
the training loss and validation perplexity curves. Meant for one GPU:

    python benchmarks/heal.py --model smollm2-135m --train-text wikitext2-valid-tokenized.txt \
        --eval-text wikitext2-raw-test.txt --out results/heal
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transmla.convert import ConvertOptions, convert  # noqa: E402
from transmla.data.text import load_text, token_windows  # noqa: E402
from transmla.evaluate import perplexity  # noqa: E402
from transmla.kv_cache import kv_values_per_token  # noqa: E402
from transmla.heal import HealOptions, heal  # noqa: E402
from transmla.heal.data import parse_tokens  # noqa: E402
from transmla.io.source import load_model  # noqa: E402

ROPE_DIM = 64


def test_perplexity(spec: str | Path, windows: torch.LongTensor, device: str, batch_size: int) -> tuple[float, int]:
    """WikiText-2 test perplexity in bf16 and the KV values cached per token."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, _ = load_model(str(spec), dtype=dtype, device=device)
    result = perplexity(model, windows, batch_size=batch_size, progress=False)
    values = sum(kv_values_per_token(model.config))
    del model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return result.perplexity, values


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run_heal(folder: Path, out: Path, tokens: int, lr: float, args: argparse.Namespace) -> tuple[Any, float]:
    reset_accelerate()
    steps = math.ceil(tokens / (args.seq_len * args.batch_size))
    options = HealOptions(
        tokens=tokens, text_file=str(args.train_text), seq_len=args.seq_len, batch_size=args.batch_size, lr=lr,
        train=args.train, warmup=args.warmup, gradient_checkpointing=args.gradient_checkpointing, checkpoint_every=0,
        eval_every=max(1, steps // 8), max_val_windows=args.val_windows, overwrite=True,
    )
    began = time.perf_counter()
    result = heal(folder, out, options, progress=args.progress)
    return result, time.perf_counter() - began


class Timer:
    """Skips runs that would end after the time limit, from the throughput measured so far."""

    def __init__(self, started: float, limit: float) -> None:
        self.started, self.limit = started, limit
        self.seconds_per_token: float | None = None
        self.overhead = 30.0

    def record(self, tokens: int, train_s: float, wall_s: float) -> None:
        self.seconds_per_token = train_s / tokens
        self.overhead = max(5.0, wall_s - train_s) + 10.0  # + the test perplexity

    def estimate(self, tokens: int) -> float:
        return self.overhead + tokens * (self.seconds_per_token or 0.0)

    def fits(self, tokens: int) -> bool:
        if self.seconds_per_token is None:
            return True
        return time.perf_counter() - self.started + self.estimate(tokens) <= self.limit


def log_recovered(converted: float, healed: float, original: float) -> float:
    """Share of the mean-NLL gap closed: (ln converted - ln healed) / (ln converted - ln original)."""
    gap = math.log(converted) - math.log(original)
    return (math.log(converted) - math.log(healed)) / gap if gap > 0 else float("nan")


def render(path: Path, rope_dim: int) -> None:
    """Rewrite heal.md and heal_curve.png beside an earlier run's heal.json."""
    data = json.loads(path.read_text())
    rows = data["runs"]
    write_table([{k: v for k, v in r.items() if k not in ("history", "evals")} for r in rows], data["original"],
                data["device"], rope_dim, path.parent / "heal.md")
    done = [r for r in rows if not r.get("skipped")]
    if done:
        plot(done, data["original"]["perplexity"], path.parent / "heal_curve.png")


def write_table(rows: list[dict[str, Any]], base: dict[str, Any], device: str, rope_dim: int, path: Path) -> None:
    lines = [
        f"Healing SmolLM2-135M ({device}); WikiText-2 test perplexity, {base['windows']} windows of 2048 tokens{', bf16' if device != 'CPU' else ''}.",
        f"Original: perplexity {base['perplexity']:.3f}, {base['kv_values']:,} KV values per token.",
        "",
        "| KV cache | R | D | train tokens | steps | heal wall time | train tok/s | converted ppl | healed ppl | gap recovered | log-ppl gap recovered |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['kv_share']:.0%} | {r['rank']} | {rope_dim} | {r['tokens']:,} | - | skipped ({r['skipped']}) | | {r['converted_ppl']:.3f} | | | |")
            continue
        lines.append(
            f"| {r['kv_share']:.0%} | {r['rank']} | {rope_dim} | {r['tokens']:,} | {r['steps']} | {r['wall_s']:.0f} s "
            f"| {r['tokens_per_s']:,.0f} | {r['converted_ppl']:.3f} | {r['healed_ppl']:.3f} | {r['recovered']:.0%} "
            f"| {log_recovered(r['converted_ppl'], r['healed_ppl'], base['perplexity']):.0%} |"
        )
    lines += ["", f"Learning rate {rows[0]['lr']:g}, chosen by validation perplexity (held-out training text).",
              "Heal wall time: the whole `heal()` call (teacher load, tokenising, validation before and after, "
              "training, writing the checkpoint). Gap recovered: (converted - healed) / (converted - original); "
              "log-ppl gap recovered: the same on log perplexity (mean NLL)."]
    path.write_text("\n".join(lines) + "\n")


def plot(runs: list[dict[str, Any]], base_ppl: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, ppl_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        label = f"{run['kv_share']:.0%} KV (R={run['rank']}), {run['tokens'] / 1e6:g}M tokens"
        history = run["history"]
        loss_ax.plot([h["tokens"] / 1e6 for h in history], [h["kl"] for h in history], label=label, linewidth=1)
        ppl_ax.plot([e["tokens"] / 1e6 for e in run["evals"]], [e["perplexity"] for e in run["evals"]], marker="o", markersize=3, label=label)
    loss_ax.set(xlabel="training tokens (M)", ylabel="KL to the teacher (nats/token)", yscale="log", title="training loss")
    ppl_ax.axhline(runs[0]["val_teacher_ppl"] if runs else base_ppl, color="black", linestyle="--", linewidth=1, label="teacher")
    ppl_ax.set(xlabel="training tokens (M)", ylabel="perplexity", yscale="log", title="held-out validation perplexity")
    for ax in (loss_ax, ppl_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="source: smollm2-135m, a .gguf file or a folder")
    parser.add_argument("--train-text", type=Path)
    parser.add_argument("--eval-text", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--render", action="store_true", help="only rewrite the table and plot from OUT/heal.json")
    parser.add_argument("--ranks", default="128,32", help="latent widths R (with D=64): 128 = 50%%, 32 = 25%% of the cache")
    parser.add_argument("--rope-dim", type=int, default=ROPE_DIM, help="width D of the shared rotary key")
    parser.add_argument("--convert-device", default="cpu", help="where the conversion's factorisations run")
    parser.add_argument("--budgets", default="1M,4M", help="training token budgets")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lrs", default="3e-4,1e-3", help="learning rates to try on the first rank and budget")
    parser.add_argument("--warmup", type=float, default=0.05)
    parser.add_argument("--train", default="attention")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--val-windows", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=None, help="first N test windows (default: all)")
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--time-limit", type=float, default=480.0, help="skip runs that would end after this many seconds")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    if args.render:
        render(args.out / "heal.json", args.rope_dim)
        print((args.out / "heal.md").read_text())
        return
    if args.train_text is None or args.eval_text is None:
        parser.error("--train-text and --eval-text are needed")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    torch.backends.cuda.matmul.allow_tf32 = True
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    budgets = sorted(parse_tokens(b) for b in args.budgets.split(","))
    ranks = [int(r) for r in args.ranks.split(",")]

    _, tokenizer = load_model(args.model, device="cpu")
    windows = token_windows(tokenizer, load_text(text_file=args.eval_text), 2048, args.eval_windows)
    base_ppl, base_values = test_perplexity(args.model, windows, device, args.eval_batch_size)
    base = {"perplexity": base_ppl, "kv_values": base_values, "windows": len(windows)}
    print(f"original: ppl {base_ppl:.3f}, {base_values} KV values/token", flush=True)

    converted: dict[int, tuple[Path, float, float]] = {}
    for rank in ranks:
        folder = work / f"mla-r{rank}"
        began = time.perf_counter()
        convert(args.model, folder, ConvertOptions(kv_lora_rank=rank, rope_dim=args.rope_dim, device=args.convert_device, overwrite=True), progress=False)
        seconds = time.perf_counter() - began
        ppl, values = test_perplexity(folder, windows, device, args.eval_batch_size)
        converted[rank] = (folder, ppl, values / base_values)
        print(f"R={rank}: converted in {seconds:.0f} s, ppl {ppl:.3f}, {values / base_values:.0%} of the KV cache", flush=True)

    timer = Timer(started, args.time_limit)

    def heal_row(rank: int, tokens: int, lr: float) -> dict[str, Any]:
        folder, conv_ppl, share = converted[rank]
        row: dict[str, Any] = {"rank": rank, "kv_share": share, "tokens": tokens, "lr": lr, "converted_ppl": conv_ppl}
        if not timer.fits(tokens):
            row["skipped"] = f"time limit, about {timer.estimate(tokens):.0f} s needed"
            print(f"R={rank} {tokens:,}: {row['skipped']}", flush=True)
            return row
        out = work / f"healed-r{rank}-{tokens}-{lr:g}"
        result, wall = run_heal(folder, out, tokens, lr, args)
        timer.record(result.tokens, result.seconds, wall)
        healed_ppl, _ = test_perplexity(out, windows, device, args.eval_batch_size)
        shutil.rmtree(out, ignore_errors=True)
        gap = conv_ppl - base_ppl
        row.update(
            steps=result.steps, wall_s=wall, train_s=result.seconds, tokens_per_s=result.tokens / result.seconds,
            healed_ppl=healed_ppl, recovered=(conv_ppl - healed_ppl) / gap if gap > 0 else float("nan"),
            val_teacher_ppl=result.teacher_perplexity, val_before_ppl=result.before_perplexity,
            val_after_ppl=result.after_perplexity, history=result.history, evals=result.evals,
        )
        print(f"R={rank} {tokens:,} tokens, lr {lr:g}: {wall:.0f} s ({row['tokens_per_s']:,.0f} tok/s), validation ppl "
              f"{result.before_perplexity:.2f} -> {result.after_perplexity:.2f}; test ppl {conv_ppl:.3f} -> {healed_ppl:.3f} "
              f"(original {base_ppl:.3f}), recovered {row['recovered']:.0%}", flush=True)
        return row

    # learning rate: the lowest perplexity on the held-out part of the training text, first rank, smallest budget
    lrs = [float(x) for x in args.lrs.split(",")]
    sweep = [heal_row(ranks[0], budgets[0], lr) for lr in lrs]
    done = [r for r in sweep if not r.get("skipped")]
    best = min(done, key=lambda r: r["val_after_ppl"]) if done else {"lr": lrs[0]}
    print(f"learning rate {best['lr']:g} (validation perplexity)", flush=True)
    rows: list[dict[str, Any]] = []
    for tokens in budgets:
        for rank in ranks:
            rows.append(best if (rank, tokens) == (ranks[0], budgets[0]) and "steps" in best else heal_row(rank, tokens, best["lr"]))

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "heal.json").write_text(json.dumps({"device": device_name, "settings": settings, "original": base,
                                                    "lr_sweep": sweep, "runs": rows}, indent=1) + "\n")
    write_table([{k: v for k, v in r.items() if k not in ("history", "evals")} for r in rows], base, device_name, args.rope_dim, args.out / "heal.md")
    done = [r for r in rows if not r.get("skipped")]
    if done:
        try:
            plot(done, base_ppl, args.out / "heal_curve.png")
        except ImportError as err:
            print(f"no plot: {err}")
    shutil.rmtree(work, ignore_errors=True)
    print((args.out / "heal.md").read_text())
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
