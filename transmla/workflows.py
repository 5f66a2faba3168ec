"""Commands made of several stages: convert then heal, convert (then heal) then export."""

from __future__ import annotations

import shutil
from dataclasses import asdict, replace
from pathlib import Path

from transmla.convert import ConvertOptions, convert
from transmla.export_deepseek import ExportOptions, ExportReport, export_deepseek
from transmla.export_deepseek.export import refuse_inexpressible
from transmla.heal import HealOptions, HealResult, heal
from transmla.io.converted import is_converted
from transmla.io.output_dir import check_output_dir


def unhealed_dir(out: Path | str) -> Path:
    """Where `convert_and_heal` keeps the plain conversion: `OUT.unhealed` beside OUT."""
    out = Path(out).expanduser().absolute()
    return out.parent / f"{out.name}.unhealed"


def convert_and_heal(spec: str, out: Path | str, convert_options: ConvertOptions, options: HealOptions,
                     progress: bool = True) -> HealResult:
    """Convert SRC (into OUT.unhealed, reused if already complete), then heal it into OUT with SRC as the teacher.

    The unhealed folder is removed after success unless `options.keep_work_dir`.
    """
    from accelerate import PartialState

    out = Path(out).expanduser().absolute()
    check_output_dir(out, options.overwrite)
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


def convert_deepseek(spec: str, out: Path | str, convert_options: ConvertOptions, options: ExportOptions | None = None,
                     progress: bool = True, heal_options: HealOptions | None = None) -> ExportReport | None:
    """Convert SRC with one rotary component per frequency into a work folder beside OUT, optionally heal it
    (`heal_options`: HealOptions, SRC as the teacher), then export it to OUT and remove the work folder.

    Under `accelerate launch` every process heals; only the main process exports (the others return None).
    """
    from accelerate import PartialState

    out = Path(out).expanduser().absolute()
    options = options or ExportOptions()
    options.check()
    check_output_dir(out, options.overwrite)
    check_source_exportable(spec)
    convert_options = replace(convert_options, rope_per_frequency=True, output_bias=False, overwrite=True)
    work = out.parent / f"{out.name}.mla-work"
    state = PartialState()
    try:
        if heal_options is not None:
            folder = convert_and_heal(spec, work / "healed", convert_options, replace(heal_options, overwrite=True),
                                      progress).out
        else:
            folder = convert(spec, work / "mla", convert_options, progress)
        state.wait_for_everyone()
        return export_deepseek(folder, out, options, progress) if state.is_main_process else None
    finally:
        if state.is_main_process:
            shutil.rmtree(work, ignore_errors=True)


def check_source_exportable(spec: str) -> None:
    """Before converting: refuse, in one line, a source whose converted model stock DeepSeek-V3 can not express."""
    from transmla.families import check_family
    from transmla.inspection import load_config

    config = load_config(spec)
    family = check_family(config)
    refuse_inexpressible({**family.runtime_config(config), "qk_norm": family.qk_norm is not None}, config.model_type)
