"""Quality benchmark: perplexity of each conversion method against the published converters, per KV budget.

Rows: the original model; our implementations of the published baselines, MHA2MLA (2-norm partial RoPE, joint
SVD of the key and value weights) and TransMLA (RoRoPE with freqfold 2, balanced-KV PCA of calibration
activations); our methods (`pca`, `whiten`, `whiten` with energy rank allocation, and `whiten` with the tool's own
split of each budget). Budgets are fractions of the source's KV cache at D = 64 (R = budget * 2*G*d - 64); the
own-split rows choose D and per-layer R themselves. Every method calibrates on the calibration file only.

    python benchmarks/quality.py --out benchmarks/results/quality --max-windows 4
    python benchmarks/quality.py --methods whiten --budgets 0.5 --out /tmp/q    # one row

Writes quality.json (rows, appended as they finish; reruns skip rows already there), quality.md and
quality.png (perplexity against KV bytes per token, one line per method) under --out. The generalisation
column is the perplexity on a second, non-Wikipedia English text that ships with every Python: the Python
Language Reference topics of `pydoc_data.topics`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transmla.convert import ConvertOptions  # noqa: E402
from transmla.convert.calibration_data import calibration_ids  # noqa: E402
from transmla.convert.geometry import Geometry  # noqa: E402
from transmla.convert.pipeline import convert_in_memory  # noqa: E402
from transmla.convert.recipe import LayerSettings  # noqa: E402
from transmla.data.text import load_text, token_windows  # noqa: E402
from transmla.evaluate import perplexity  # noqa: E402
from transmla.io.source import open_source  # noqa: E402

DATA = ROOT.parent / "shared" / "data"  # the data folder beside the repository (see its README)
BUDGETS = (1.0, 0.75, 0.5, 0.25)
ROPE_DIM = 64


@dataclass
class Method:
    """A row family: convert options, layer-settings overrides, whether it calibrates, and its own budget split."""

    label: str
    options: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    calibrate: bool = True
    own_split: bool = False


METHODS = {
    "mha2mla": Method("MHA2MLA (2-norm RoPE + joint weight SVD)", {"method": "svd", "rope_select": "norm"},
                      {"latent_key_scale": 1.0, "shrink": False}),
    "transmla": Method("TransMLA (RoRoPE + freqfold 2 + balanced-KV PCA)", {"method": "pca", "freqfold": 2},
                       {"shrink": False}),
    "pca": Method("ours: pca (+ query shrink, cost-ranked RoPE)", {"method": "pca"}),
    "whiten": Method("ours: whiten (default, score weight 30)", {"method": "whiten"}),
    "whiten-sw3": Method("ours: whiten, score weight 3", {"method": "whiten", "score_weight": 3.0}),
    "whiten-sw10": Method("ours: whiten, score weight 10", {"method": "whiten", "score_weight": 10.0}),
    "whiten-sw100": Method("ours: whiten, score weight 100", {"method": "whiten", "score_weight": 100.0}),
    "whiten-energy": Method("ours: whiten + energy ranks", {"method": "whiten", "rank_allocation": "energy"}),
    "whiten-split": Method("ours: whiten, own D, energy R (kv-budget, score weight 10)",
                           {"method": "whiten", "rank_allocation": "energy", "score_weight": 10.0}, own_split=True),
    "whiten-split-uniform": Method("ours: whiten, own D, uniform R (kv-budget, score weight 10)",
                                   {"method": "whiten", "rank_allocation": "uniform", "score_weight": 10.0},
                                   own_split=True),
}


ABLATIONS = ("whiten-sw3", "whiten-sw10", "whiten-sw100", "whiten-energy", "whiten-split")  # in the table, not the plot


def generalisation_text() -> str:
    """The Python Language Reference topics that ship with CPython (pydoc_data), in topic order."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def run_row(source: Any, name: str, budget: float, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    method = METHODS[name]
    geo = Geometry.of(source.config)
    values = int(budget * geo.kv_values)
    opts = {"dtype": "float32", "device": args.device, "calib_file": str(args.calib_file),
            "calib_samples": args.calib_samples, "calib_seq_len": args.calib_seq_len, **method.options}
    if method.own_split:
        opts["kv_budget"] = budget
    else:
        opts |= {"rope_dim": args.rope_dim, "kv_lora_rank": values - args.rope_dim}
    options = ConvertOptions(**opts).resolved(geo)
    settings = LayerSettings.of(options, **method.settings)
    ids = calibration_ids(source, options) if method.calibrate else None
    start = time.perf_counter()
    model, sizes = convert_in_memory(source, options, settings, ids)
    seconds = time.perf_counter() - start
    ranks = sizes.ranks
    row = {"method": name, "label": method.label, "budget": budget, "rope_dim": sizes.rope_dim,
           "rank_min": min(ranks), "rank_max": max(ranks), "rank_mean": sum(ranks) / len(ranks),
           "kv_values_per_token": sum(r + sizes.rope_dim for r in ranks), "convert_seconds": seconds}
    return model, row


def evaluate(model: Any, windows: dict[str, torch.Tensor], row: dict[str, Any], base: dict[str, Any] | None) -> None:
    for key, w in windows.items():
        result = perplexity(model, w, progress=False)
        row[f"ppl_{key}"] = result.perplexity
        if base is not None:
            row[f"ratio_{key}"] = result.perplexity / base[f"ppl_{key}"]


def fmt_rank(row: dict[str, Any]) -> str:
    return str(row["rank_min"]) if row["rank_min"] == row["rank_max"] else f"{row['rank_min']}-{row['rank_max']} (mean {row['rank_mean']:.0f})"


def write_table(rows: list[dict[str, Any]], out: Path, args: argparse.Namespace) -> None:
    order = ["original", *METHODS]
    rows = sorted(rows, key=lambda r: (order.index(r["method"]), -r["budget"]))
    base = rows[0]
    lines = [
        f"# Conversion quality: {args.model}",
        "",
        f"Perplexity on the first {args.max_windows} windows of {args.seq_len} tokens of `{args.text_file.name}` "
        f"(float32, {args.device}); generalisation: the same on the Python Language Reference topics "
        f"(`pydoc_data.topics`). Calibration: {args.calib_samples} x {args.calib_seq_len} tokens of "
        f"`{args.calib_file.name}`. KV values per token are summed over layers; `x orig` = perplexity / original.",
        "",
        "| method | budget | R | D | KV values/token | ppl | x orig | ppl (general.) | x orig | convert s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        general = f"{row['ppl_general']:.2f} | {row.get('ratio_general', 1.0):.3f}" if "ppl_general" in row else "- | -"
        if row["method"] == "original":
            lines.append(f"| original | 100% | - | - | {row['kv_values_per_token']} | {row['ppl_main']:.2f} | 1.000 | {general} | - |")
            continue
        lines.append(
            f"| {row['label']} | {row['budget']:.0%} | {fmt_rank(row)} | {row['rope_dim']} | {row['kv_values_per_token']} | "
            f"{row['ppl_main']:.2f} | {row['ratio_main']:.3f} | {general} | {row['convert_seconds']:.0f} |"
        )
    command = f"python benchmarks/quality.py --device {args.device} --max-windows {args.max_windows} --out {args.out}"
    if args.model != "smollm2-135m":
        command += " --model PATH"
    lines += ["", f"Command: `{command}` (rows are appended as they finish; `--methods` / `--budgets` select rows, "
              "`--render-only` redraws this page and the plot from quality.json).", ""]
    (out / "quality.md").write_text("\n".join(lines))
    plot(rows, out / "quality.png", base)


def plot(rows: list[dict[str, Any]], path: Path, base: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in METHODS:
        if name in ABLATIONS:
            continue
        pts = sorted((r["kv_values_per_token"] * 2, r["ppl_main"]) for r in rows if r["method"] == name)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=METHODS[name].label)
    ax.axhline(base["ppl_main"], color="k", linestyle="--", linewidth=1, label="original")
    ax.scatter([base["kv_values_per_token"] * 2], [base["ppl_main"]], color="k", zorder=5)
    ax.set_xlabel("KV cache bytes per token (bf16, all layers)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    top = 20 * base["ppl_main"]  # rows above 20x the original are off the chart
    ax.set_ylim(0.9 * base["ppl_main"], top)
    ax.set_title(f"perplexity (log) vs KV cache; points above {top:.0f} are off the chart", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text-file", type=Path, default=DATA / "wikitext2-raw-test.txt")
    parser.add_argument("--calib-file", type=Path, default=DATA / "wikitext2-valid-tokenized.txt")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--rope-dim", type=int, default=ROPE_DIM, help="D of the fixed-split rows")
    parser.add_argument("--max-windows", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument("--general-budgets", nargs="*", type=float, default=list(BUDGETS),
                        help="budgets also evaluated on the generalisation text")
    parser.add_argument("--dev-file", type=Path, help="also report perplexity on this text (for choosing settings)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--render-only", action="store_true", help="only redraw quality.md and quality.png")
    args = parser.parse_args()
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "quality.json"
    rows: list[dict[str, Any]] = json.loads(store.read_text()) if store.is_file() else []
    done = {(r["method"], r["budget"]) for r in rows}
    if args.render_only:
        write_table(rows, args.out, args)
        return

    source = open_source(args.model)
    tokenizer = source.load_tokenizer()
    main_windows = token_windows(tokenizer, load_text(args.text_file), args.seq_len, args.max_windows)
    general_windows = token_windows(tokenizer, generalisation_text(), args.seq_len, args.max_windows)
    dev_windows = None if args.dev_file is None else token_windows(tokenizer, load_text(args.dev_file), args.seq_len, args.max_windows)

    def save() -> None:
        store.write_text(json.dumps(rows, indent=2) + "\n")
        write_table(rows, args.out, args)

    if ("original", 1.0) not in done:
        from transmla.io.source import load_model

        model, _ = load_model(args.model, device=args.device)
        row = {"method": "original", "label": "original", "budget": 1.0, "rope_dim": None,
               "kv_values_per_token": Geometry.of(source.config).kv_values * Geometry.of(source.config).layers}
        windows = {"main": main_windows, "general": general_windows} | ({} if dev_windows is None else {"dev": dev_windows})
        evaluate(model, {k: v.to(args.device) for k, v in windows.items()}, row, None)
        rows.insert(0, row)
        save()
        del model
    base = rows[0]
    for name in args.methods:
        for budget in args.budgets:
            if (name, budget) in done:
                continue
            model, row = run_row(source, name, budget, args)
            windows = {"main": main_windows}
            if any(math.isclose(budget, b) for b in args.general_budgets):
                windows["general"] = general_windows
            if dev_windows is not None:
                windows["dev"] = dev_windows
            evaluate(model.to(args.device), {k: v.to(args.device) for k, v in windows.items()}, row, base)
            rows.append(row)
            print(json.dumps(row), flush=True)
            save()
            del model


if __name__ == "__main__":
    main()
