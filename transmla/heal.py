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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import TransMLAError
from .heal_checkpoint import TrainState, check_work_dir, checkpoints, default_work_dir, start_work_dir
from .heal_data import Windows, sample_windows, split_windows, text_stream, val_window_count
from .heal_loop import TrainingLoop, mean_nll
from .io import atomic_output_dir, check_writable
from .source import is_converted, load_model

MODELING_DIR = Path(__file__).parent / "modeling"
MODELING_FILES = ("configuration_transmla.py", "modeling_transmla.py", "mla_decode.py")
TRAIN_CHOICES = ("attention", "latent", "all")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class HealOptions:
    """Settings of one healing run."""

    tokens: int
    text_file: str | None = None
    dataset: str | None = None
    self_distill: bool = False
    teacher: str | None = None  # None: the converted folder's `source_model`
    train: str = "attention"  # attention | latent (kv_a_proj, kv_b_proj) | all
    seq_len: int = 2048
    batch_size: int = 4  # windows per micro-batch and process
    grad_accum: int = 1
    lr: float = 3e-4
    warmup: float = 0.05  # share of the steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    gradient_checkpointing: bool = True
    mixed_precision: str = "auto"  # auto (bf16 on a GPU that has it) | bf16 | fp16 | no
    val_fraction: float = 0.05
    max_val_windows: int = 16
    eval_every: int = 0  # steps between validation perplexities (0: only before and after)
    checkpoint_every: int = 200  # steps between checkpoints (0: none)
    keep_checkpoints: int = 2
    work_dir: str | None = None  # None: OUT.heal-work beside OUT
    keep_work_dir: bool = False
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    dtype: str = "auto"  # dtype of the written model; auto: the converted folder's

    def settings(self, folder: Path, teacher: str, processes: int) -> dict[str, Any]:
        """What a resumed run must share with the interrupted one."""
        keep = ("tokens", "dataset", "self_distill", "train", "seq_len", "batch_size", "grad_accum", "lr", "warmup",
                "weight_decay", "max_grad_norm", "temperature", "kl_weight", "ce_weight", "val_fraction",
                "max_val_windows", "seed")
        text = str(Path(self.text_file).expanduser().absolute()) if self.text_file else None
        return {"folder": str(folder), "teacher": teacher, "text_file": text, "processes": processes,
                **{k: getattr(self, k) for k in keep}}


@dataclass
class HealResult:
    """What a healing run did and the validation perplexities around it."""

    out: str
    steps: int
    tokens: int
    seconds: float
    teacher_perplexity: float
    before_perplexity: float
    after_perplexity: float
    train_windows: int
    validation_windows: int
    data: str
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)

    @property
    def recovered(self) -> float:
        """Share of the validation perplexity gap to the teacher that healing closed."""
        gap = self.before_perplexity - self.teacher_perplexity
        return (self.before_perplexity - self.after_perplexity) / gap if gap > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "recovered": self.recovered}


def check_options(folder: Path, out: Path, options: HealOptions) -> None:
    """Refuse bad input before anything heavy is loaded."""
    if not folder.exists():
        raise TransMLAError(f"{folder} does not exist; give the folder written by `transmla convert`")
    if not folder.is_dir() or not is_converted(folder):
        raise TransMLAError(f"{folder} is not a converted checkpoint (no config.json with model_type 'transmla'); run `transmla convert` first")
    sources = [options.text_file is not None, options.dataset is not None, options.self_distill]
    if sum(sources) != 1:
        raise TransMLAError("give exactly one source of training text: --text-file, --dataset or --self-distill")
    if options.text_file is not None and not Path(options.text_file).expanduser().is_file():
        raise TransMLAError(f"text file not found: {options.text_file}; pass the path of an existing UTF-8 text file")
    if options.train not in TRAIN_CHOICES:
        raise TransMLAError(f"--train {options.train!r} is not one of {', '.join(TRAIN_CHOICES)}")
    if options.tokens < 1:
        raise TransMLAError(f"--tokens must be positive, got {options.tokens}")
    for name in ("batch_size", "grad_accum", "seq_len"):
        if getattr(options, name) < 1:
            raise TransMLAError(f"--{name.replace('_', '-')} must be positive, got {getattr(options, name)}")
    if options.temperature <= 0:
        raise TransMLAError(f"--temperature must be positive, got {options.temperature}")
    if options.kl_weight < 0 or options.ce_weight < 0 or options.kl_weight + options.ce_weight == 0:
        raise TransMLAError("--kl-weight and --ce-weight must be >= 0 and not both 0")
    if options.mixed_precision not in ("auto", "bf16", "fp16", "no"):
        raise TransMLAError(f"--mixed-precision {options.mixed_precision!r} is not one of auto, bf16, fp16, no")
    if options.dtype != "auto" and options.dtype not in DTYPES:
        raise TransMLAError(f"--dtype {options.dtype!r} is not one of auto, {', '.join(DTYPES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not options.overwrite:
        raise TransMLAError(f"{out} exists and is not empty; pass --overwrite or choose another --out")


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
    if options.dtype != "auto":
        return DTYPES[options.dtype]
    config = json.loads((folder / "config.json").read_text())
    return DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")), torch.float32)


def teacher_spec(folder: Path, options: HealOptions) -> str:
    if options.teacher:
        return options.teacher
    spec = json.loads((folder / "config.json").read_text()).get("source_model")
    if not spec:
        raise TransMLAError(f"{folder}/config.json names no source_model; pass --teacher with the original model")
    return spec


def load_teacher(spec: str, device: torch.device, vocab_size: int):
    """The frozen original model on this process's device (a full copy per process), bf16 on a GPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        teacher, _ = load_model(spec, dtype=dtype, device=device)
    except TransMLAError as err:
        raise TransMLAError(f"could not load the teacher {spec!r}: {err}; pass --teacher with the original model") from err
    if teacher.config.get_text_config().vocab_size < vocab_size:
        raise TransMLAError(f"the teacher {spec!r} has a smaller vocabulary than the student; pass the model it was converted from with --teacher")
    teacher.requires_grad_(False)
    return teacher.eval()


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


def build_windows(options: HealOptions, tokenizer: Any, teacher: Any, accelerator: Any, work: Path, resuming: bool, progress: bool) -> Windows:
    """Training and validation windows from the text source, or sampled from the teacher (cached in the work folder)."""
    n_val = val_window_count(options.tokens, options.seq_len, options.val_fraction, options.max_val_windows)
    if not options.self_distill:
        budget = (math.ceil(options.tokens / options.seq_len) + n_val) * options.seq_len
        stream, source = text_stream(tokenizer, options.text_file, options.dataset, budget)
        return split_windows(stream, options.seq_len, options.val_fraction, options.max_val_windows, source)
    cache = work / "self_distill.pt"
    if resuming and cache.is_file():
        windows = torch.load(cache)
    else:
        count = math.ceil(options.tokens / options.seq_len) + n_val
        share = math.ceil(count / accelerator.num_processes)
        mine = sample_windows(teacher, tokenizer, share, options.seq_len, max(options.batch_size, 8),
                              options.seed + 1000 * accelerator.process_index, progress=progress and accelerator.is_local_main_process)
        windows = accelerator.gather(mine.to(accelerator.device)).cpu()[:count]
        if accelerator.is_main_process:
            torch.save(windows, cache)
    return Windows(windows[: len(windows) - n_val].clone(), windows[len(windows) - n_val :].clone(), "sampled from the teacher")


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
            unwrapped.save_pretrained(tmp, state_dict=state, max_shard_size="5GB")
            for name in MODELING_FILES:
                shutil.copyfile(MODELING_DIR / name, tmp / name)
            tokenizer.save_pretrained(tmp)
            if (folder / "generation_config.json").is_file():
                shutil.copyfile(folder / "generation_config.json", tmp / "generation_config.json")
            record = json.loads((folder / "transmla.json").read_text()) if (folder / "transmla.json").is_file() else {}
            (tmp / "transmla.json").write_text(json.dumps({**record, "heal": info}, indent=2, default=str) + "\n")
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
        return _run(folder, out, options, accelerator, spec, work, resume_from, progress, on_step)
    except BaseException:
        if accelerator.is_main_process and not checkpoints(work):
            shutil.rmtree(work, ignore_errors=True)  # nothing worth resuming
        raise


def _run(folder: Path, out: Path, options: HealOptions, accelerator: Any, spec: str, work: Path,
         resume_from: Path | None, progress: bool, on_step: Callable[[int, dict[str, float]], None] | None) -> HealResult:
    """Load, train, validate and write (the body of `heal`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    with accelerator.main_process_first():  # one process fills the caches (remote code, downloads) first
        student = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        teacher = load_teacher(spec, accelerator.device, student.config.vocab_size)
    windows = build_windows(options, tokenizer, teacher, accelerator, work, options.resume, progress)
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


def unhealed_dir(out: Path | str) -> Path:
    """Where `convert_and_heal` keeps the plain conversion: `OUT.unhealed` beside OUT."""
    out = Path(out).expanduser().absolute()
    return out.parent / f"{out.name}.unhealed"


def convert_and_heal(spec: str, out: Path | str, convert_options: Any, options: HealOptions, progress: bool = True) -> HealResult:
    """Convert SRC (into OUT.unhealed, reused if already complete), then heal it into OUT with SRC as the teacher.

    The unhealed folder is removed after success unless `options.keep_work_dir`.
    """
    from accelerate import PartialState

    from .convert import convert

    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not options.overwrite:
        raise TransMLAError(f"{out} exists and is not empty; pass --overwrite or choose another --out")
    plain = unhealed_dir(out)
    state = PartialState()
    if state.is_main_process and not (plain.is_dir() and is_converted(plain) and not convert_options.overwrite):
        convert(spec, plain, convert_options, progress=progress)
    state.wait_for_everyone()
    options = HealOptions(**{**asdict(options), "teacher": options.teacher or spec})
    try:
        result = heal(plain, out, options, progress=progress)
    except KeyboardInterrupt:
        if state.is_main_process:
            print(f"continue with: transmla heal {plain} --out {out} --resume (and the same healing options)")
        raise
    if state.is_main_process and not options.keep_work_dir:
        shutil.rmtree(plain, ignore_errors=True)
    return result


def heal_data_options(tokens: str, data: str | None, overwrite: bool = False) -> HealOptions:
    """HealOptions for `convert --heal-tokens N --heal-data X`: X is a text file, a dataset name or `self-distill`."""
    from .heal_data import parse_tokens

    if not data:
        raise TransMLAError("--heal-tokens needs --heal-data: a text file, a dataset name (wikitext2, c4, owner/name) or self-distill")
    count = parse_tokens(tokens)
    if data == "self-distill":
        return HealOptions(tokens=count, self_distill=True, overwrite=overwrite)
    if Path(data).expanduser().is_file():
        return HealOptions(tokens=count, text_file=data, overwrite=overwrite)
    return HealOptions(tokens=count, dataset=data, overwrite=overwrite)
