"""The same command on the same machine writes the same bytes: `transmla convert` run twice (a fresh process and an
empty sample cache each time), the weights compared by hash.

    python benchmarks/reproduce.py --device cuda --out benchmarks/results      # SmolLM2-135M, default flags
    python benchmarks/reproduce.py --out benchmarks/results                    # the same on the CPU

Writes reproduce-<device>.json under --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def weights_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("flags", nargs="*", help="further convert flags (after --)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="transmla-reproduce-"))
    runs = []
    try:
        for index in range(2):
            env = {**os.environ, "TRANSMLA_CACHE": str(work / f"cache{index}")}  # each run samples afresh
            command = [sys.executable, "-m", "transmla", "convert", args.model, "--out", str(work / f"out{index}"),
                       "--device", args.device, *args.flags]
            began = time.perf_counter()
            subprocess.run(command, check=True, env=env, cwd=ROOT)
            runs.append({"seconds": time.perf_counter() - began, "weights_sha256": weights_hash(work / f"out{index}")})
        config = json.loads((work / "out0" / "config.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record = {"command": "transmla convert " + " ".join([args.model, "--out", "OUT", "--device", args.device, *args.flags]),
              "identical": runs[0]["weights_sha256"] == runs[1]["weights_sha256"], "runs": runs,
              "sampled": (config.get("conversion") or {}).get("calibration", {}).get("sampled")}
    print(json.dumps(record, indent=1))
    name = "cuda" if args.device.startswith("cuda") else "cpu"
    (args.out / f"reproduce-{name}.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
