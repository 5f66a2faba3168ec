"""`transmla heal`: recover a converted model's quality by distilling the original model into it.

The student (the converted checkpoint) learns the teacher's next-token distributions (KL divergence, optionally
plus cross-entropy on the text) on packed windows of training text. Training runs through `accelerate`, so the
same code runs on a CPU, one GPU (bf16 mixed precision) or several (`accelerate launch`, DDP or FSDP).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from transmla.defaults import MAX_SHARD_BYTES
from transmla.determinism import deterministic
from transmla.errors import TransMLAError
from transmla.io.converted import config_dtype, copy_modeling_files, parse_dtype, read_record, write_record
from transmla.io.output_dir import atomic_output_dir, check_writable
from transmla.io.source import fingerprint, load_model, load_tokenizer, require_tokenizer, resolve

from .checkpoint import TrainState, check_work_dir, checkpoints, default_work_dir, start_work_dir
from .data import build_windows
from .loop import TrainingLoop, mean_nll
from .options import HealOptions, HealResult, check_options


def make_accelerator(options: HealOptions):
    """An Accelerator with bf16 autocast on GPUs that support it (unless `accelerate launch` chose already)."""
    from accelerate import Accelerator

    precision: str | None = options.mixed_precision
    if precision == "auto":
        if os.environ.get("ACCELERATE_MIXED_PRECISION"):
            precision = None
        elif torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            precision = "bf16"
        else:
            precision = "no"
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=options.grad_accum)


def saved_dtype(folder: Path, options: HealOptions) -> torch.dtype:
    return parse_dtype(options.dtype) or config_dtype(json.loads((folder / "config.json").read_text()))


def teacher_spec(folder: Path, options: HealOptions) -> str:
    if options.teacher:
        return options.teacher
    spec = json.loads((folder / "config.json").read_text()).get("source_model")
    if not spec:
        raise TransMLAError(f"{folder}/config.json names no source_model; pass --teacher with the original model")
    return spec


def load_teacher(spec: str, device: torch.device, vocab_size: int):
    """The frozen original model on this process's device (a full copy per process), bf16 on a GPU, and its
    tokenizer (None if it has none)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        teacher, tokenizer = load_model(spec, dtype=dtype, device=device, need_tokenizer=False)
    except TransMLAError as err:
        raise TransMLAError(f"could not load the teacher {spec!r}: {err}; pass --teacher with the original model") from err
    if teacher.config.get_text_config().vocab_size < vocab_size:
        raise TransMLAError(f"the teacher {spec!r} has a smaller vocabulary than the student; pass the model it was converted from with --teacher")
    teacher.requires_grad_(False)
    return teacher.eval(), tokenizer


def select_trainable(model: torch.nn.Module, train: str) -> int:
    """Freeze all but the chosen parameters; the count of trainable values."""
    def wanted(name: str) -> bool:
        if train == "all":
            return True
        if train == "latent":
            return ".self_attn.kv_a_proj." in name or ".self_attn.kv_b_proj." in name
        return ".self_attn." in name

    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(wanted(name))
        count += param.numel() if param.requires_grad else 0
    return count


def save_healed(accelerator: Any, model: Any, tokenizer: Any, folder: Path, out: Path, info: dict[str, Any],
                dtype: torch.dtype, overwrite: bool) -> None:
    """Write the student as a converted checkpoint (weights, modeling code, tokenizer, generation config)."""
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        state = {k: v.detach().to("cpu", dtype) for k, v in state.items()}
        config = unwrapped.config
        config.conversion = {**(config.conversion or {}), "heal": info}
        config.dtype = str(dtype).removeprefix("torch.")
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            unwrapped.save_pretrained(tmp, state_dict=state, max_shard_size=MAX_SHARD_BYTES)
            copy_modeling_files(tmp)
            tokenizer.save_pretrained(tmp)
            if (folder / "generation_config.json").is_file():
                shutil.copyfile(folder / "generation_config.json", tmp / "generation_config.json")
            write_record(tmp, {**read_record(folder), "heal": info})
    accelerator.wait_for_everyone()


def heal(
    folder: Path | str,
    out: Path | str,
    options: HealOptions,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> HealResult:
    """Distil the teacher into the converted checkpoint FOLDER and write the result to OUT.

    `on_step(step, record)` is called after every optimizer step. Checkpoints go to the work folder every
    `checkpoint_every` steps (and on Ctrl-C, single process); `options.resume` continues from the newest.
    """
    folder = Path(folder).expanduser().absolute()
    out = Path(out).expanduser().absolute()
    check_options(folder, out, options)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_writable(out.parent)
    accelerator = make_accelerator(options)
    options = options.resolved(json.loads((folder / "config.json").read_text()), accelerator.device)
    from accelerate.utils import set_seed

    set_seed(options.seed)
    spec = teacher_spec(folder, options)
    work = Path(options.work_dir).expanduser().absolute() if options.work_dir else default_work_dir(out)
    settings = options.settings(folder, spec, accelerator.num_processes)
    resume_from = check_work_dir(work, settings, options.resume, options.overwrite)  # every process, read only
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and resume_from is None:
        start_work_dir(work, settings)
    accelerator.wait_for_everyone()

    try:
        with deterministic():
            return _run(folder, out, options, accelerator, spec, work, resume_from, progress, on_step)
    except BaseException:
        if accelerator.is_main_process and not checkpoints(work):
            shutil.rmtree(work, ignore_errors=True)  # nothing worth resuming
        raise


def _run(folder: Path, out: Path, options: HealOptions, accelerator: Any, spec: str, work: Path,
         resume_from: Path | None, progress: bool, on_step: Callable[[int, dict[str, float]], None] | None) -> HealResult:
    """Load, train, validate and write (the body of `heal`)."""
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    with accelerator.main_process_first():  # one process fills the caches (remote code, downloads) first
        student = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
        teacher, teacher_tokenizer = load_teacher(spec, accelerator.device, student.config.vocab_size)
        tokenizer = require_tokenizer(load_tokenizer(folder, trust_remote_code=True) or teacher_tokenizer, folder, "healing")
    windows = build_windows(options, tokenizer, teacher, fingerprint(*resolve(spec)), accelerator, progress)
    trainable = select_trainable(student, options.train)
    if options.gradient_checkpointing:
        enable = getattr(student, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()

    world = accelerator.num_processes
    tokens_per_step = options.seq_len * options.batch_size * options.grad_accum * world
    total_steps = math.ceil(options.tokens / tokens_per_step)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.lr, betas=(0.9, 0.95), weight_decay=options.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(options.warmup * total_steps), total_steps)
    student, optimizer = accelerator.prepare(student, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        accelerator.print(f"resuming from step {state.step} of {total_steps} ({resume_from.name})")
    if not state.baseline:
        state.baseline = {"teacher_nll": mean_nll(teacher, windows.validation, options.batch_size, accelerator),
                          "before_nll": mean_nll(student, windows.validation, options.batch_size, accelerator)}
        state.evals.append({"step": 0, "tokens": 0, "perplexity": math.exp(state.baseline["before_nll"])})
    accelerator.print(
        f"healing {options.train} ({trainable:,} values) on {len(windows.train)} windows of {options.seq_len} "
        f"({windows.source}), {total_steps} steps of {tokens_per_step:,} tokens; validation perplexity: "
        f"teacher {math.exp(state.baseline['teacher_nll']):.3f}, student {math.exp(state.baseline['before_nll']):.3f}"
    )

    run = TrainingLoop(accelerator, student, teacher, optimizer, scheduler, state, windows, options, work,
                       total_steps, tokens_per_step, on_step)
    run.train(progress)

    after_nll = mean_nll(student, windows.validation, options.batch_size, accelerator)
    if not state.evals or state.evals[-1]["step"] != state.step:
        state.evals.append({"step": state.step, "tokens": state.tokens, "perplexity": math.exp(after_nll)})
    result = HealResult(
        out=str(out), steps=state.step, tokens=state.tokens, seconds=state.seconds,
        teacher_perplexity=math.exp(state.baseline["teacher_nll"]), before_perplexity=math.exp(state.baseline["before_nll"]),
        after_perplexity=math.exp(after_nll), train_windows=len(windows.train),
        validation_windows=len(windows.validation), data=windows.source, history=state.history, evals=state.evals,
    )
    info = {"teacher": spec, "data": windows.source, "tokens": state.tokens, "steps": state.step,
            "train": options.train, "lr": options.lr, "temperature": options.temperature, "ce_weight": options.ce_weight,
            "validation_perplexity": {"teacher": result.teacher_perplexity, "before": result.before_perplexity,
                                      "after": result.after_perplexity}}
    save_healed(accelerator, student, tokenizer, folder, out, info, saved_dtype(folder, options), options.overwrite)
    if accelerator.is_main_process:
        (out / "heal_log.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        if not options.keep_work_dir:
            shutil.rmtree(work, ignore_errors=True)
    accelerator.wait_for_everyone()
    return result


