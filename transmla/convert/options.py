"""The settings of one conversion: every default and every check on them, in one place."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from transmla.data.mixture import TextSource, parse_sources
from transmla.defaults import MAX_SHARD_BYTES, default_of
from transmla.errors import TransMLAError
from transmla.io.converted import parse_dtype

from .geometry import Geometry
from .methods import METHODS, calibrated_methods, method
from .refine import TARGETS as REFINE_TARGETS
from .rope import ROPE_SELECTIONS

ALLOCATIONS = ("uniform", "energy", "loss")
OFFLOAD_MODES = ("auto", "never", "always")
FREQFOLD_AUTO = (1, 2, 4)  # the folds that `--freqfold auto` tries per layer
DEFAULT_KV_BUDGET = 0.5  # calibrated, no sizes given: half the source's KV cache, D and R chosen by measured loss
GPU_CALIB_SAMPLES = 256  # calibration sequences by default on a GPU
GPU_REFINE_STEPS = 200  # refinement steps per layer by default on a GPU (none on a CPU: minutes per layer)
GPU_REFINE_BATCH = 32  # calibration sequences per refinement step on a GPU (a step costs about the same at 4)
CPU_REFINE_BATCH = 4  # ... and on a CPU, where a step costs its arithmetic
CPU_CALIB_SAMPLES = 16  # ... and on a CPU, where sampling and calibrating cost minutes (its cost: README)


@dataclass
class ConvertOptions:
    """Settings of one conversion; every lossy choice is here."""

    kv_lora_rank: int | None = None  # None: half of the source's KV cache minus the rotary key
    rope_dim: int | None = None  # None: 64, or all key dims if the source has fewer
    method: str = "whiten"
    dtype: str = "auto"
    device: str = "cpu"
    rope_context: int = 16  # weights-only: distances over which a dropped rotation is costed (measured: README)
    rope_per_frequency: bool = False  # one rotary component per frequency: exportable to stock DeepSeek code
    # Calibrated conversion (--method pca|whiten): text, rotary selection, budget.
    calib_sources: tuple[str, ...] = ()  # self, file:PATH, dataset:NAME, each [@WEIGHT]; none: self (sampled)
    calib_samples: int | None = None  # None: 64 on a GPU, CPU_CALIB_SAMPLES on a CPU
    calib_seq_len: int = 512
    calib_seed: int = 0
    calib_temperature: float = 1.0  # sampling temperature of the `self` source (the model's own distribution)
    calib_offload: str = "auto"  # auto | never | always: calibration hidden states in a memory-mapped file
    rope_select: str = "rotate"  # rotate | norm | high-freq | uniform
    freqfold: int | str = 1  # or "auto": per layer, on the calibration loss
    rank_allocation: str = "uniform"  # uniform | energy | loss: per-layer R by water-filling (measured: README)
    kv_budget: float | None = None  # fraction of the source's KV cache; picks R (per layer) and D
    query_shrink: bool = True  # calibrated: dropped rotations replaced by their attention-weighted average
    score_weight: float = 30.0  # whiten: weight of score errors against output errors (measured: docs/calibration.md)
    refit_values: bool = True  # whiten: least-squares value up-projection under the converted attention
    refine_steps: int | None = None  # calibrated: gradient steps per layer on its attention error (None: by device)
    refine_lr: float = 1e-3  # relative to each tensor's RMS
    refine_target: str = "residual"  # local | residual (refine.py; measured: docs/calibration.md)
    refine_output: bool = True  # o_proj's weight refines too
    output_bias: bool = True  # whiten: an o_proj bias for the mean value error (off: stock DeepSeek-V3 can serve it)
    max_shard_bytes: int = MAX_SHARD_BYTES
    overwrite: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def calibrated(self) -> bool:
        """Whether the method measures activations on calibration text."""
        return self.method in METHODS and METHODS[self.method].calibrated

    def rank(self, geo: Geometry) -> int:
        """The uniform latent width: given, or half of the source's KV cache minus the rotary key."""
        return geo.default_rank(self.rope_dim) if self.kv_lora_rank is None else self.kv_lora_rank

    def lossless(self, geo: Geometry) -> bool:
        """Whether these (resolved) sizes keep every key and value dim, so that the conversion is exact whatever
        the inputs and needs no calibration text."""
        if self.kv_budget is not None:
            return int(self.kv_budget * geo.kv_values) >= geo.kv_values and self.rope_dim in (None, geo.key_dims)
        return geo.is_lossless(self.rank(geo), self.rope_dim)

    def resolved(self, geo: Geometry) -> "ConvertOptions":
        """These options with the rotary width filled in (unless a budget chooses it), checked against the source:
        one clear error for the first bad value, before any heavy work."""
        options = self
        if options.calibrated and options.kv_lora_rank is None and options.rope_dim is None and options.kv_budget is None:
            options = replace(options, kv_budget=DEFAULT_KV_BUDGET)  # the split of it is measured
        if options.rope_dim is None and options.kv_budget is None:
            default = geo.default_rope_dim()
            options = replace(options, rope_dim=min(default, geo.head_dim) if options.rope_per_frequency else default)
        on_gpu = str(options.device).startswith("cuda")
        if options.calib_samples is None:
            options = replace(options, calib_samples=GPU_CALIB_SAMPLES if on_gpu else CPU_CALIB_SAMPLES)
        if options.refine_steps is None:
            options = replace(options, refine_steps=GPU_REFINE_STEPS if on_gpu and options.calibrated else 0)
        options.check(geo)
        return options

    @property
    def refine_batch(self) -> int:
        """Calibration sequences per refinement step on this device."""
        return GPU_REFINE_BATCH if str(self.device).startswith("cuda") else CPU_REFINE_BATCH

    def sources(self) -> list[TextSource]:
        """The calibration mixture (the model's own samples when none is named)."""
        return parse_sources(self.calib_sources)

    def check(self, geo: Geometry) -> None:
        """Raise TransMLAError naming the first option that this source can not take, and the fix."""
        half = geo.head_dim // 2
        if self.rope_dim is not None:
            if self.rope_per_frequency and self.rope_dim > geo.head_dim:
                raise TransMLAError(f"--rope-dim {self.rope_dim} is too wide for one component per frequency: use at most {geo.head_dim} (the head width)")
            geo.check(self.rank(geo), self.rope_dim)
        method(self.method)
        if self.kv_budget is not None and self.kv_lora_rank is not None:
            raise TransMLAError("--kv-budget chooses the latent width itself: leave out --kv-lora-rank (or --kv-budget)")
        if self.kv_budget is not None and not 0 < self.kv_budget <= 1:
            raise TransMLAError(f"--kv-budget {self.kv_budget} must be a fraction in (0, 1] of the source's KV cache")
        if self.kv_budget is not None and self.rope_dim is not None and int(self.kv_budget * geo.kv_values) <= self.rope_dim:
            raise TransMLAError(f"--kv-budget {self.kv_budget} leaves no room for a latent next to --rope-dim {self.rope_dim}")
        if self.refine_steps is not None and self.refine_steps < 0:
            raise TransMLAError(f"--refine {self.refine_steps} must be a number of steps, 0 or more")
        if self.refine_steps and not self.calibrated:
            raise TransMLAError(f"--refine needs calibration text: use --method {' or '.join(calibrated_methods())}, not {self.method}")
        if self.refine_target not in REFINE_TARGETS:
            raise TransMLAError(f"--refine-target {self.refine_target!r} is not one of {', '.join(REFINE_TARGETS)}")
        if not self.refine_lr > 0:
            raise TransMLAError(f"--refine-lr {self.refine_lr} must be positive")
        if self.score_weight <= 0:
            raise TransMLAError(f"--score-weight {self.score_weight} must be positive")
        if self.calib_offload not in OFFLOAD_MODES:
            raise TransMLAError(f"--calib-offload {self.calib_offload!r} is not one of {', '.join(OFFLOAD_MODES)}")
        if self.rank_allocation not in ALLOCATIONS:
            raise TransMLAError(f"--rank-allocation {self.rank_allocation!r} is not one of {', '.join(ALLOCATIONS)}")
        if self.rope_select not in ROPE_SELECTIONS:
            raise TransMLAError(f"--rope-select {self.rope_select!r} is not one of {', '.join(ROPE_SELECTIONS)}")
        fold = str(self.freqfold)
        if fold != "auto":
            if not fold.isdigit() or int(fold) < 1 or half % int(fold):
                raise TransMLAError(f"--freqfold {self.freqfold} must divide the {half} frequencies of a head")
            if self.rope_select != "rotate" and int(fold) != 1:
                raise TransMLAError("--freqfold applies to --rope-select rotate only")
        if self.rope_per_frequency and self.rope_select != "rotate":
            raise TransMLAError("one rotary component per frequency is available with --rope-select rotate only")
        if self.rope_per_frequency and fold != "1":
            raise TransMLAError(f"one rotary component per frequency needs --freqfold 1 and --rope-dim <= {2 * half}")
        parse_dtype(self.dtype)
        if self.max_shard_bytes <= 0:
            raise TransMLAError(f"--max-shard-size must be positive, got {self.max_shard_bytes / 2**30:g} GiB")
        if not self.calibrated and self.calib_sources:
            raise TransMLAError(f"--method {self.method} reads no calibration text: leave out --calib-source/--calib-file/--calib-dataset, or use --method {calibrated_methods()[0]}")
        if self.calibrated:
            self.sources()
            if self.calib_temperature <= 0:
                raise TransMLAError(f"--calib-temperature {self.calib_temperature} must be positive")
            if self.calib_samples < 1:
                raise TransMLAError(f"number of calibration samples must be at least 1, got {self.calib_samples}")
            if self.calib_seq_len < 2:
                raise TransMLAError(f"sequence length {self.calib_seq_len} is too short; use at least 2 tokens")


def default(name: str) -> Any:
    """The default of one ConvertOptions field (for the command line, so that each default is written once)."""
    return default_of(ConvertOptions, name)
