"""`transmla heal` in two processes (DDP on the gloo backend, on the CPU, as `torchrun` starts it): each step
takes a micro-batch from each process, and a run killed midway resumes to the same weights as one that was not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny import save_source
from transmla.convert import ConvertOptions, convert

TEXT = "Two processes heal one converted model, each on its own share of the windows. " * 200
HEAL = ["--tokens", "4k", "--seq-len", "32", "--batch-size", "2", "--lr", "3e-3", "--warmup", "0",
        "--checkpoint-every", "8", "--mixed-precision", "no", "--no-gradient-checkpointing"]


# `transmla heal` with every optimizer step slowed down, so that a kill lands mid-run.
SLOW_HEAL = """
import sys, time
import transmla.heal.loop as loop
real = loop.TrainingLoop.step
def slow(self):
    time.sleep(0.1)
    return real(self)
loop.TrainingLoop.step = slow
from transmla.cli import app
app(["heal", *sys.argv[1:]])
"""


def torchrun(args: list[str], env: dict[str, str], root: Path, processes: int = 2, quiet: bool = False) -> subprocess.Popen:
    script = root / "slow_heal.py"
    script.write_text(SLOW_HEAL)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}", "--master-port",
               str(29500 + os.getpid() % 1000), str(script), *args]
    out = subprocess.DEVNULL if quiet else subprocess.PIPE  # nobody reads a run that will be killed
    return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    save_source("llama-gqa", root / "src")
    convert(str(root / "src"), root / "mla", ConvertOptions(method="svd", kv_lora_rank=8, rope_dim=8), progress=False)
    (root / "text.txt").write_text(TEXT)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "TRANSMLA_CACHE": str(root / "cache")}
    return root, env


def test_two_processes_heal_and_resume_after_a_kill(setup):
    root, env = setup
    args = [str(root / "mla"), "--text-file", str(root / "text.txt"), *HEAL]
    done = torchrun([*args, "--out", str(root / "straight")], env, root)
    output, _ = done.communicate(timeout=300)
    assert done.returncode == 0, output
    assert "32 steps of 128 tokens" in output  # 2 processes x 2 windows of 32 tokens per step

    # kill both processes once the first checkpoint is complete, then resume
    killed = torchrun([*args, "--out", str(root / "resumed")], env, root, quiet=True)
    work = root / "resumed.heal-work"
    deadline = time.time() + 240
    while time.time() < deadline and not (work / "checkpoint-00000008" / "complete").exists():
        time.sleep(0.05)
    import psutil

    for process in [*psutil.Process(killed.pid).children(recursive=True), psutil.Process(killed.pid)]:
        process.send_signal(signal.SIGKILL)  # the launcher and both workers, at once
    killed.wait()
    assert (work / "checkpoint-00000008" / "complete").exists() and not (root / "resumed").exists()
    resumed = torchrun([*args, "--out", str(root / "resumed"), "--resume"], env, root)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert "resuming from step" in output
    straight, again = weights(root / "straight"), weights(root / "resumed")
    assert all(torch.equal(straight[k], again[k]) for k in straight)


@pytest.mark.parametrize("name", ["ddp-2gpu.yaml", "fsdp-2gpu.yaml"])
def test_accelerate_configs_load_and_name_our_layer(name):
    from accelerate.commands.config.config_args import load_config_from_file

    from transmla.modeling import modeling_transmla

    config = load_config_from_file(str(Path(__file__).parents[1] / "recipes" / "accelerate" / name))
    assert config.num_processes == 2 and config.mixed_precision == "bf16"
    if config.fsdp_config:
        assert hasattr(modeling_transmla, config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"])
        assert config.fsdp_config["fsdp_use_orig_params"]  # frozen and trained parameters share the wrapped layers
