"""The settings of one healing run, the record of its result, and the checks on them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from transmla.data.mixture import TextSource, parse_sources
from transmla.defaults import default_of
from transmla.errors import TransMLAError
from transmla.io.converted import is_converted, parse_dtype
from transmla.io.output_dir import check_output_dir

TRAIN_CHOICES = ("attention", "latent", "all")
GPU_BATCH = 8  # windows of seq_len per micro-batch on a GPU (16k tokens per step at 2048)
CPU_BATCH = 4
ACTIVATION_SHARE = 0.5  # without checkpointing, the activations may take this share of the GPU's free memory


@dataclass
class HealOptions:
    """Settings of one healing run."""

    tokens: int
    data: tuple[str, ...] = ()  # self (sampled from the teacher), file:PATH, dataset:NAME, each [@WEIGHT]; none: self
    sample_len: int = 512  # tokens per teacher sample (samples are packed into training windows)
    sampled_tokens: int = 1_000_000  # unique teacher tokens at most; a longer run repeats them (measured: README)
    sample_temperature: float = 1.0
    teacher: str | None = None  # None: the converted folder's `source_model`
    train: str = "attention"  # attention | latent (kv_a_proj, kv_b_proj) | all
    seq_len: int = 2048
    batch_size: int | None = None  # windows per micro-batch and process; None: GPU_BATCH on a GPU, CPU_BATCH on a CPU
    grad_accum: int = 1
    lr: float = 3e-4
    warmup: float = 0.05  # share of the steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    gradient_checkpointing: bool | None = None  # None: only where the activations would not fit (`resolved`)
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

    def resolved(self, config: dict[str, Any], device: Any) -> "HealOptions":
        """These options with the batch and checkpointing filled in for `device` and the student's config (a
        converted folder's config.json): on a GPU checkpointing only where the activations of a micro-batch would
        not fit in ACTIVATION_SHARE of its free memory, on a CPU always."""
        import torch

        on_gpu = torch.device(device).type == "cuda"
        batch = self.batch_size or (GPU_BATCH if on_gpu else CPU_BATCH)
        checkpointing = self.gradient_checkpointing
        if checkpointing is None:
            checkpointing = True
            if on_gpu:
                free = torch.cuda.mem_get_info(torch.device(device))[0]
                checkpointing = batch * self.seq_len * activation_bytes_per_token(config) > ACTIVATION_SHARE * free
        return replace(self, batch_size=batch, gradient_checkpointing=checkpointing)

    def settings(self, folder: Path, teacher: str, processes: int) -> dict[str, Any]:
        """What a resumed run must share with the interrupted one."""
        keep = ("tokens", "sample_len", "sampled_tokens", "sample_temperature", "train", "seq_len", "batch_size",
                "grad_accum", "lr", "warmup", "weight_decay", "max_grad_norm", "temperature", "kl_weight", "ce_weight",
                "val_fraction", "max_val_windows", "seed")
        data = [str(Path(s.value).expanduser().absolute()) if s.kind == "file" else s.label for s in self.sources()]
        return {"folder": str(folder), "teacher": teacher, "data": data, "processes": processes,
                **{k: getattr(self, k) for k in keep}}

    def sources(self) -> list[TextSource]:
        """The training-text mixture (text sampled from the teacher when none is named)."""
        return parse_sources(self.data, "--data")


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


def activation_bytes_per_token(config: dict[str, Any]) -> int:
    """About what one training token keeps for the backward pass without checkpointing (bf16 activations: per
    layer some twenty hidden-wide and six MLP-wide tensors; the logits are taken in chunks)."""
    hidden, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
    intermediate = int(config.get("intermediate_size") or 4 * hidden)
    return 2 * layers * (20 * hidden + 6 * intermediate)


def check_options(folder: Path, out: Path, options: HealOptions) -> None:
    """Refuse bad input before anything heavy is loaded."""
    if not folder.exists():
        raise TransMLAError(f"{folder} does not exist; give the folder written by `transmla convert`")
    if not folder.is_dir() or not is_converted(folder):
        raise TransMLAError(f"{folder} is not a converted checkpoint (no config.json with model_type 'transmla'); run `transmla convert` first")
    options.sources()
    for name in ("sample_len", "sampled_tokens"):
        if getattr(options, name) < 2:
            raise TransMLAError(f"--{name.replace('_', '-')} must be at least 2, got {getattr(options, name)}")
    if options.sample_temperature <= 0:
        raise TransMLAError(f"--sample-temperature must be positive, got {options.sample_temperature}")
    if options.train not in TRAIN_CHOICES:
        raise TransMLAError(f"--train {options.train!r} is not one of {', '.join(TRAIN_CHOICES)}")
    if options.tokens < 1:
        raise TransMLAError(f"--tokens must be positive, got {options.tokens}")
    for name in ("batch_size", "grad_accum", "seq_len"):
        if getattr(options, name) is not None and getattr(options, name) < 1:
            raise TransMLAError(f"--{name.replace('_', '-')} must be positive, got {getattr(options, name)}")
    if options.temperature <= 0:
        raise TransMLAError(f"--temperature must be positive, got {options.temperature}")
    if options.kl_weight < 0 or options.ce_weight < 0 or options.kl_weight + options.ce_weight == 0:
        raise TransMLAError("--kl-weight and --ce-weight must be >= 0 and not both 0")
    if options.mixed_precision not in ("auto", "bf16", "fp16", "no"):
        raise TransMLAError(f"--mixed-precision {options.mixed_precision!r} is not one of auto, bf16, fp16, no")
    parse_dtype(options.dtype)
    check_output_dir(out, options.overwrite)


def default(name: str) -> Any:
    """The default of one HealOptions field (for the command line, so that each default is written once)."""
    return default_of(HealOptions, name)
