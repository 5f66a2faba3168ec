"""Checkpoint I/O: opening sources, lazy tensor reading, sharded safetensors writing, atomically created output
folders, the checks to run before heavy work, and what a converted folder holds."""

from transmla.io.converted import DTYPES, copy_modeling_files, is_converted, parse_dtype
from transmla.io.output_dir import atomic_output_dir, check_free_disk, check_writable, cleanup_stale_temp_dirs
from transmla.io.reader import SafetensorsSource, StateDictSource, TensorSource
from transmla.io.writer import ShardedSafetensorsWriter

__all__ = [
    "DTYPES",
    "SafetensorsSource",
    "ShardedSafetensorsWriter",
    "StateDictSource",
    "TensorSource",
    "atomic_output_dir",
    "check_free_disk",
    "check_writable",
    "cleanup_stale_temp_dirs",
    "copy_modeling_files",
    "is_converted",
    "parse_dtype",
]
