"""Healing throughput, phase by phase: where a distillation step of `transmla heal` spends its time, for several
settings side by side in one run.

A converted SmolLM2-135M (or --model; closed form, half the cache) is the student, the source in bf16 the
teacher; the windows are random tokens (speed does not depend on them). Every setting runs `--warmup` steps,
then `--steps` timed steps with CUDA events around each phase: the teacher's forward, the student's forward and
the loss, the backward, the optimizer step. Each phase is timed between device synchronisations. Settings: windows per step, gradient checkpointing, the KL over the
whole vocabulary at once or in chunks of tokens, `torch.compile` of each decoder layer, which weights train,
deterministic kernels on or off.

    python benchmarks/heal_speed.py --device cuda --out benchmarks/results

Writes heal_speed.json and heal_speed.md under --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transmla.convert import ConvertOptions  # noqa: E402
from transmla.convert.pipeline import convert_in_memory  # noqa: E402
from transmla.data.sampling import device_name  # noqa: E402
from transmla.heal.loss import distillation_loss, hidden_distillation_loss  # noqa: E402
from transmla.heal.run import select_trainable  # noqa: E402
from transmla.io.source import open_source  # noqa: E402

SETTINGS = {
    "b8": dict(batch=8),
    "b8-chunked": dict(batch=8, chunked=True),
    "b16-chunked": dict(batch=16, chunked=True),
    "b32-chunked": dict(batch=32, chunked=True),
    "b8-chunked-nondeterministic": dict(batch=8, chunked=True, deterministic=False),
    "b8-chunked-compiled": dict(batch=8, chunked=True, compiled=True),
    "b16-chunked-compiled": dict(batch=16, chunked=True, compiled=True),
    "b8-chunked-all": dict(batch=8, chunked=True, train="all"),
    "b1-cpu": dict(batch=1, chunked=True),
    "b4-checkpointed": dict(batch=4, checkpointing=True),
}


def sync(device: torch.device) -> float:
    """Wait for the device, then the time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed_steps(student: Any, teacher: Any, setting: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    batch, chunked = setting["batch"], setting.get("chunked", False)
    torch.use_deterministic_algorithms(setting.get("deterministic", True), warn_only=True)
    select_trainable(student, setting.get("train", "attention"))
    enable = getattr(student, "activation_checkpointing_enable", student.gradient_checkpointing_enable)
    disable = getattr(student, "activation_checkpointing_disable", student.gradient_checkpointing_disable)
    if setting.get("checkpointing"):
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        disable()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(0)
    vocab = student.config.vocab_size
    phases: dict[str, list[float]] = {"teacher": [], "student": [], "backward": [], "optimizer": []}
    student.train()
    total = 0.0
    for step in range(args.warmup + args.steps):
        ids = torch.randint(vocab, (batch, args.seq_len), generator=generator).to(device)
        marks = [sync(device)]
        with torch.no_grad():
            if chunked:
                teacher_hidden = teacher.model(input_ids=ids).last_hidden_state
            else:
                teacher_logits = teacher(input_ids=ids, use_cache=False).logits
        marks.append(sync(device))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if chunked:
                hidden = student.model(input_ids=ids, use_cache=False).last_hidden_state
                loss, _ = hidden_distillation_loss(hidden, student.lm_head, teacher_hidden, teacher.lm_head)
            else:
                logits = student(input_ids=ids, use_cache=False).logits
                loss, _ = distillation_loss(logits, teacher_logits, ids)
        marks.append(sync(device))
        loss.backward()
        marks.append(sync(device))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(sync(device))
        if step >= args.warmup:
            total += marks[-1] - marks[0]
            for name, (a, b) in zip(phases, zip(marks, marks[1:])):
                phases[name].append(1e3 * (b - a))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"tokens_per_s": args.steps * batch * args.seq_len / total, "peak_gib": peak,
            "ms": {k: sum(v) / len(v) for k, v in phases.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--model-name", help="how the report names the model [default: --model]")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    source = open_source(args.model)
    teacher = source.load_model(torch.bfloat16, args.device).eval().requires_grad_(False)
    rows = []
    for name in args.settings:
        student, _ = convert_in_memory(source, ConvertOptions(kv_budget=0.5, rope_dim=48, refine_steps=0,
                                                              calib_samples=16, device=args.device))
        student = student.to(device)
        setting = SETTINGS[name]
        if setting.get("compiled"):
            for layer in student.model.layers:
                layer.compile()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        began = time.perf_counter()
        try:
            row = {"setting": name, **setting, **timed_steps(student, teacher, setting, args)}
        except torch.OutOfMemoryError:
            row = {"setting": name, **setting, "error": "out of memory"}
        row["wall_s"] = time.perf_counter() - began
        rows.append(row)
        print(json.dumps(row), flush=True)
        del student
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record = {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
              "model": args.model_name or args.model, "seq_len": args.seq_len, "steps": args.steps,
              "command": f"python benchmarks/heal_speed.py --device {args.device} --out {args.out}", "rows": rows}
    (args.out / "heal_speed.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [f"# Healing throughput: {record['model']} on {record['device']}", "",
             f"Windows of {args.seq_len} tokens, mean over {args.steps} steps after {args.warmup} warm-up steps; "
             "milliseconds per step by phase (timed between device synchronisations).", "",
             "| setting | tokens/s | teacher ms | student fwd + loss ms | backward ms | optimizer ms | peak GiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['setting']} | {r['error']} | | | | | |")
            continue
        ms = r["ms"]
        lines.append(f"| {r['setting']} | {r['tokens_per_s']:,.0f} | {ms['teacher']:.1f} | {ms['student']:.1f} | "
                     f"{ms['backward']:.1f} | {ms['optimizer']:.1f} | {r['peak_gib']:.1f} |")
    lines += ["", f"Command: `{record['command']}` (torch {record['torch']})", ""]
    (args.out / "heal_speed.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
