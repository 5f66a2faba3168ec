"""Where the calibration hidden states live: on the device, in RAM, or in a memory-mapped file on disk."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from transmla.errors import TransMLAError

OFFLOAD_MODES = ("auto", "never", "always")


def hidden_buffer(shape: tuple[int, int, int], device: torch.device, offload: str = "auto",
                  scratch_dir: Path | None = None) -> torch.Tensor:
    """An uninitialised float32 [N, T, h] buffer for the calibration hidden states.

    On `device` when it fits in half of what is free there; otherwise (or with offload="always") in a
    memory-mapped file under `scratch_dir` (default: the system's temporary folder). The file is unlinked at once,
    so the kernel frees it when the process ends, however it ends. offload="never" keeps it on `device`.
    """
    numel = shape[0] * shape[1] * shape[2]
    if offload == "never" or (offload == "auto" and 4 * numel <= free_memory(device) // 2):
        return torch.empty(shape, dtype=torch.float32, device=device)
    if offload == "auto" and device.type != "cpu" and 4 * numel <= free_memory(torch.device("cpu")) // 2:
        return torch.empty(shape, dtype=torch.float32)
    folder = Path(scratch_dir or tempfile.gettempdir())
    if shutil.disk_usage(folder).free < 4 * numel:
        raise TransMLAError(f"the calibration hidden states ({4 * numel / 2**30:.1f} GiB) fit neither in memory nor in "
                            f"the free space of {folder}; lower --calib-samples or --calib-seq-len")
    fd, path = tempfile.mkstemp(prefix=".transmla-calibration-", suffix=".f32", dir=folder)
    try:
        os.ftruncate(fd, 4 * numel)
        buffer = torch.from_file(path, shared=True, size=numel, dtype=torch.float32)
    except OSError as exc:
        raise TransMLAError(f"cannot offload {4 * numel / 2**30:.1f} GiB of calibration hidden states to {folder} "
                            f"({exc.strerror or exc}); free space there or lower --calib-samples") from exc
    finally:
        os.close(fd)
        os.unlink(path)
    return buffer.view(shape)


def free_memory(device: torch.device) -> int:
    """Bytes available for new allocations on `device`."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available
