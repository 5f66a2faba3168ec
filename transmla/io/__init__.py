"""Checkpoint I/O: lazy tensor reading, sharded safetensors writing, and an atomically created output folder."""

from transmla.io.output_dir import atomic_output_dir, check_free_disk, check_writable, cleanup_stale_temp_dirs
from transmla.io.reader import SafetensorsSource, StateDictSource, TensorSource
from transmla.io.writer import ShardedSafetensorsWriter

__all__ = [
    "SafetensorsSource",
    "ShardedSafetensorsWriter",
    "StateDictSource",
    "TensorSource",
    "atomic_output_dir",
    "check_free_disk",
    "check_writable",
    "cleanup_stale_temp_dirs",
]
