"""Generalisation benchmark: converted (and healed) SmolLM2-135M on eight domains (prose in English, German and
Spanish, documentation, Python, C and JavaScript code, chat) that no calibration, healing or setting choice saw.

Every row is a budget (share of the source's KV cache) x a conversion setting, training-free or healed: the default
(the split of the budget between the rotary key D and the latent R measured, then the refinement), its pieces alone,
fixed splits (the split found by hand), other calibration seeds (the spread of sampled calibration text), the
DeepSeek-V3 export. Every row is evaluated on the test text of each domain (the table) and on its dev text (for
choosing settings). Domains and their provenance: `benchmarks/domains.py`. Baselines are our implementations of the
published training-free recipes (TransMLA: RoRoPE + freqfold 2 + balanced-KV PCA; MHA2MLA: 2-norm partial RoPE +
joint SVD of the weights), calibrated on WikiText-2 as published.

    python benchmarks/generalize.py --device cuda --out benchmarks/results/generalize
    python benchmarks/generalize.py --rows default --budgets 0.5 --out /tmp/g     # one row

Writes generalize.json (rows, appended as they finish; reruns skip rows already there), generalize.md and
generalize.png under --out; `--render-only` redraws the last two from the JSON.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import domains  # noqa: E402
from transmla.convert import ConvertOptions, convert  # noqa: E402
from transmla.convert.geometry import Geometry  # noqa: E402
from transmla.convert.pipeline import convert_in_memory  # noqa: E402
from transmla.convert.recipe import LayerSettings  # noqa: E402
from transmla.data.text import load_text, token_windows  # noqa: E402
from transmla.evaluate import perplexity  # noqa: E402
from transmla.heal import HealOptions, heal  # noqa: E402
from transmla.heal.data import parse_tokens  # noqa: E402
from transmla.io.source import load_model, open_source  # noqa: E402

BUDGETS = (1.0, 0.75, 0.5, 0.375, 0.25, 0.125)
PAIR = (0.5, 0.25)  # budgets of the rows that compare one setting against the default
BASELINE_ROPE_DIM = 64  # the published recipes' rotary width
WIKI_CALIB = f"file:{domains.wikitext_calibration_file()}"  # WikiText-2 validation less the WikiText dev articles


@dataclass
class Row:
    """A row family: convert options (every field not given is the tool's default: the budget split measured, the
    refinement of the device), recipe overrides, healing, and the budgets it is measured at."""

    label: str
    options: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    heal: dict[str, Any] | None = None  # HealOptions fields; None: training-free
    budgets: tuple[float, ...] = PAIR
    ablation: bool = False  # in the table, not the plot
    export: bool = False  # written with `convert --format deepseek`, evaluated as stock DeepSeek-V3


CLOSED = {"refine_steps": 0}
BY_HAND = {0.75: (64, 96, 128), 0.5: (32, 48, 64), 0.375: (32, 48, 64), 0.25: (16, 32, 48), 0.125: (16, 32)}
SEED_SPLIT = {0.5: 48, 0.25: 32}  # the rotary width of the calibration-seed rows (the default's split at each)
PUBLISHED_CALIB = {"calib_samples": 64}  # the baselines' calibration, as first measured
ROWS = {
    "default": Row("ours, no data (default): split measured, refined", budgets=BUDGETS),
    "closed-form": Row("ours, closed form only (--refine 0)", CLOSED, budgets=BUDGETS),
    "refine-local": Row("refined against the source layer on the converted inputs, o_proj fixed",
                        {"refine_target": "local", "refine_output": False}, ablation=True),
    "refine-64": Row("refined on 64 calibration sequences, 4 per step, 300 steps (the earlier default)",
                     {"calib_samples": 64, "refine_steps": 300, "refine_target": "local", "refine_output": False},
                     ablation=True),
    **{f"d{d}": Row(f"closed form, D = {d} fixed", {**CLOSED, "rope_dim": d}, ablation=True,
                    budgets=tuple(b for b, ds in BY_HAND.items() if d in ds)) for d in (16, 32, 48, 64, 96, 128)},
    **{f"seed{i}": Row(f"closed form at the default's split, calibration seed {i}", {**CLOSED, "calib_seed": i},
                       ablation=True) for i in range(1, 5)},
    "per-frequency": Row("closed form, one rotary component per frequency", {**CLOSED, "rope_per_frequency": True},
                         budgets=(0.5,), ablation=True),
    "deepseek": Row("closed form, exported to DeepSeek-V3 (no o_proj bias)", CLOSED, budgets=(0.5,), ablation=True,
                    export=True),
    "transmla-wiki": Row("TransMLA (ours) on WikiText-2", {"method": "pca", "freqfold": 2, "calib_sources": (WIKI_CALIB,),
                                                           "rope_dim": BASELINE_ROPE_DIM, "refine_steps": 0,
                                                           **PUBLISHED_CALIB},
                         {"shrink": False}),
    "mha2mla-wiki": Row("MHA2MLA (ours) on WikiText-2", {"method": "svd", "rope_select": "norm", "rope_dim": BASELINE_ROPE_DIM},
                        {"latent_key_scale": 1.0, "shrink": False}),
    "heal-1M": Row("default, healed 1M tokens", heal={"tokens": "1M"}),
    "heal-4M": Row("default, healed 4M tokens (default heal)", heal={"tokens": "4M"}),
    "heal-16M": Row("default, healed 16M tokens", heal={"tokens": "16M"}),
    "heal-4M-all": Row("default, healed 4M tokens, every weight trained", heal={"tokens": "4M", "train": "all"},
                       ablation=True),
}
HEAL_DEFAULTS = {"checkpoint_every": 0, "overwrite": True}  # otherwise the tool's defaults for the device


def texts(tokenizer: Any, max_windows: int) -> dict[str, torch.Tensor]:
    """`domain/split` -> the first windows of 2048 tokens of that text (every domain has at least 4 of them)."""
    return {f"{d}/{s}": token_windows(tokenizer, load_text(text_file=domains.path(d, s)), 2048, max_windows)
            for d in domains.DOMAINS for s in ("test", "dev")}


def evaluate(model: Any, windows: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, float]:
    model = model.to(args.device, getattr(torch, args.eval_dtype)).eval()
    return {key: perplexity(model, w, progress=False).perplexity for key, w in windows.items()}


def options_for(row: Row, budget: float, geo: Geometry, args: argparse.Namespace) -> ConvertOptions:
    """The row's options at `budget`: a fixed rotary width takes the rest of the budget as R, else the budget is
    split as the tool splits it."""
    opts = {"dtype": "float32", "device": args.device, **row.options}
    if "calib_seed" in opts:
        opts["rope_dim"] = SEED_SPLIT[budget]
    if "rope_dim" in opts:
        opts["kv_lora_rank"] = int(budget * geo.kv_values) - opts["rope_dim"]
    else:
        opts["kv_budget"] = budget
    return ConvertOptions(**opts)


def training_free(source: Any, row: Row, budget: float, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    geo = Geometry.of(source.config)
    options = options_for(row, budget, geo, args).resolved(geo)
    if row.export:
        return exported(row, budget, options, args)
    if not row.settings and not row.options:  # the default: written once, loaded here and healed by the heal rows
        base, convert_s = converted_folder(row, budget, args)
        model, _ = load_model(str(base), device=args.device)
        config = json.loads((base / "config.json").read_text())
        return model, {"convert_s": convert_s, "ranks": config["kv_lora_rank"], "rope_dim": config["qk_rope_head_dim"],
                       "split": config["conversion"].get("kv_budget_split"), "refine_steps": options.refine_steps,
                       "calibration": {"sources": ["self"], "samples": options.calib_samples, "seed": options.calib_seed}}
    settings = LayerSettings.of(options, **row.settings)
    ids = None
    if options.method == "svd" and row.options.get("rope_select") == "norm":  # MHA2MLA: norms of activations
        from transmla.convert.calibration_data import calibration_ids

        ids = calibration_ids(source, replace(options, calib_sources=(WIKI_CALIB,), **PUBLISHED_CALIB))
    began = time.perf_counter()
    model, sizes = convert_in_memory(source, options, settings, ids)
    record = {"convert_s": time.perf_counter() - began, "ranks": sizes.ranks, "rope_dim": sizes.rope_dim,
              "split": sizes.losses and {str(k): v for k, v in sizes.losses.items()},
              "calibration": {"sources": list(options.calib_sources) or ["self"], "samples": options.calib_samples,
                              "seed": options.calib_seed}, "refine_steps": options.refine_steps}
    return model, record


def exported(row: Row, budget: float, options: ConvertOptions, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """`convert --format deepseek` with the row's options, loaded as stock transformers DeepSeek-V3."""
    from transmla.workflows import convert_deepseek

    out = args.work / "deepseek"
    began = time.perf_counter()
    report = convert_deepseek(args.model, out, replace(options, overwrite=True), progress=args.progress)
    seconds = time.perf_counter() - began
    model, _ = load_model(str(out), device=args.device)
    config = json.loads((out / "config.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return model, {"convert_s": seconds, "ranks": [report.kv_lora_rank] * config["num_hidden_layers"],
                   "rope_dim": config["qk_rope_head_dim"], "model_type": config["model_type"]}


def converted_folder(row: Row, budget: float, args: argparse.Namespace) -> tuple[Path, float]:
    """The row's conversion at `budget`, written once per budget and options under the work folder (so that the
    default's training-free row and its heal rows share it), and the seconds it took (0 when reused)."""
    source = open_source(args.model)
    options = options_for(row, budget, Geometry.of(source.config), args)
    key = hashlib.sha256(json.dumps(row.options, sort_keys=True, default=str).encode()).hexdigest()[:12]
    base = args.work / f"converted-{budget:g}-{key}"  # the same across processes, so a rerun reuses it
    began = time.perf_counter()
    if not (base / "config.json").is_file():
        convert(args.model, base, replace(options, overwrite=True), progress=False)
    return base, time.perf_counter() - began


def healed(row: Row, budget: float, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The row's conversion at `budget` (made once per budget and options), healed as the row says."""
    base, convert_s = converted_folder(row, budget, args)
    spec = {**HEAL_DEFAULTS, **row.heal}
    spec["tokens"] = max(1, int(parse_tokens(spec["tokens"]) * args.heal_scale))
    out = args.work / "healed"
    began = time.perf_counter()
    result = heal(base, out, HealOptions(**spec), progress=args.progress)
    wall = time.perf_counter() - began
    model, _ = load_model(str(out), device=args.device)
    shutil.rmtree(out, ignore_errors=True)
    config = json.loads((base / "config.json").read_text())
    record = {"ranks": config["kv_lora_rank"], "rope_dim": config["qk_rope_head_dim"], "convert_s": convert_s,
              "heal_s": wall, "train_s": result.seconds, "tokens": result.tokens, "steps": result.steps,
              "tokens_per_s": result.tokens / max(result.seconds, 1e-9), "data": result.data,
              "lr": spec.get("lr", HealOptions.lr), "history": result.history[-1:]}
    return model, record


def summary(row: dict[str, Any], base: dict[str, Any]) -> None:
    """Ratios to the original per domain and split, their mean and worst."""
    for split in ("test", "dev"):
        ratios = {d: row["ppl"][f"{d}/{split}"] / base["ppl"][f"{d}/{split}"] for d in domains.DOMAINS}
        row[f"ratio_{split}"] = ratios
        row[f"worst_{split}"] = max(ratios.values())
        row[f"mean_{split}"] = math.exp(sum(math.log(r) for r in ratios.values()) / len(ratios))


def write_report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    base = next(r for r in rows if r["row"] == "original")
    order = ["original", *ROWS]
    rows = sorted(rows, key=lambda r: (order.index(r["row"]), -r["budget"]))
    heads = " | ".join(domains.LABELS[d] for d in domains.DOMAINS)
    lines = [
        f"# Generalisation: {args.model_name or args.model}",
        "",
        f"Perplexity ratio to the original on the first {args.max_windows} windows of 2048 tokens of each domain's "
        f"test text ({base['eval_dtype']}, {base['device']}); `worst` is the largest ratio over the domains, `mean` their geometric "
        f"mean, `dev worst` the same on the dev texts (used to choose settings). D: the shared rotary key, R: the "
        "latent (per layer).",
        "",
        f"| row | KV kept | D | R | {heads} | mean | worst | dev worst | seconds |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in domains.DOMAINS) + " | --- | --- | --- | --- |",
    ]
    lines.append("| original | 100% | - | - | " + " | ".join(f"{base['ppl'][f'{d}/test']:.2f}" for d in domains.DOMAINS)
                 + " | (perplexity) | | | |")
    for r in rows[1:]:
        ranks = r["ranks"]
        rank = str(ranks[0]) if min(ranks) == max(ranks) else f"{min(ranks)}-{max(ranks)}"
        seconds = r.get("heal_s", 0) + r.get("convert_s", 0)
        cells = " | ".join(f"{r['ratio_test'][d]:.3f}" for d in domains.DOMAINS)
        lines.append(f"| {ROWS[r['row']].label} | {r['budget']:.1%} | {r.get('rope_dim', '-')} | {rank} | {cells} | "
                     f"{r['mean_test']:.3f} | **{r['worst_test']:.3f}** | {r['worst_dev']:.3f} | {seconds:.0f} |")
    command = f"python benchmarks/generalize.py --device {args.device} --max-windows {args.max_windows} --out {args.out}"
    if args.model != "smollm2-135m":
        command += f" --model {args.model}"
    lines += ["", f"Command: `{command}` (seconds: the conversion, plus the whole `heal()` call for healed rows; "
              "`--rows` / `--budgets` select rows, `--render-only` redraws this page and the plot).", ""]
    (args.out / "generalize.md").write_text("\n".join(lines))
    try:
        plot(rows, args.out / "generalize.png")
    except ImportError:  # a machine without matplotlib: `--render-only` draws it elsewhere
        print("matplotlib is not installed: generalize.png not drawn", flush=True)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, row in ROWS.items():
        if row.ablation:
            continue
        pts = sorted((r["budget"], r["worst_test"]) for r in rows if r["row"] == name)
        if pts:
            ax.plot([100 * b for b, _ in pts], [w for _, w in pts], marker="o", label=row.label,
                    linestyle="--" if row.heal else "-")
    ax.axhline(1.0, color="k", linewidth=1)
    ax.set(xlabel="KV cache kept (%)", ylabel="worst-domain perplexity ratio (log)", yscale="log",
           title=f"perplexity / original, worst of {len(domains.DOMAINS)} domains (test texts)")
    ax.set_ylim(0.95, 200)  # MHA2MLA (training-free) lies above
    ax.invert_xaxis()
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--model-name", help="how the report names the model [default: --model]")
    parser.add_argument("--max-windows", type=int, default=4)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--budgets", nargs="+", type=float, help="only these of each row's budgets")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eval-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, help="scratch folder for checkpoints of healed rows [default: OUT/work]")
    parser.add_argument("--heal-scale", type=float, default=1.0, help="scale every healing token budget (smoke tests)")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--keep-work", action="store_true", help="keep the work folder (conversions that later heal rows reuse)")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work = args.work or args.out / "work"
    store = args.out / "generalize.json"
    rows: list[dict[str, Any]] = json.loads(store.read_text()) if store.is_file() else []
    if args.render_only:
        return write_report(rows, args)
    source = open_source(args.model)
    windows = texts(source.require_tokenizer("evaluation"), args.max_windows)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"

    def save() -> None:
        store.write_text(json.dumps(rows, indent=1) + "\n")
        write_report(rows, args)

    if not any(r["row"] == "original" for r in rows):
        model = source.load_model(torch.float32, args.device)
        rows.append({"row": "original", "budget": 1.0, "device": device_name, "eval_dtype": args.eval_dtype,
                     "ppl": evaluate(model, windows, args)})
        del model
        save()
    base = next(r for r in rows if r["row"] == "original")
    for name in args.rows:
        row = ROWS[name]
        for budget in [b for b in row.budgets if args.budgets is None or any(math.isclose(b, x) for x in args.budgets)]:
            if any(r["row"] == name and math.isclose(r["budget"], budget) for r in rows):
                continue
            began = time.perf_counter()
            try:
                model, record = healed(row, budget, args) if row.heal else training_free(source, row, budget, args)
            except Exception:  # reported; the other rows still run
                traceback.print_exc()
                print(f"{name} {budget:.0%}: failed", flush=True)
                continue
            result = {"row": name, "budget": budget, "device": device_name, **record,
                      "ppl": evaluate(model, windows, args)}
            summary(result, base)
            rows.append(result)
            print(f"{name} {budget:.0%}: worst {result['worst_test']:.3f} mean {result['mean_test']:.3f} "
                  f"(dev worst {result['worst_dev']:.3f}) {time.perf_counter() - began:.0f} s", flush=True)
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            save()
    if not args.keep_work:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
