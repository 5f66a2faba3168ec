"""The README's quick start, timed and evaluated as a new user runs it, on this machine.

With `--setup`, first the README's set-up line in a fresh virtual environment (pip's cache off); then the main job
(`transmla convert smollm2-135m --out smollm2-mla`, an empty sample cache), the README's `transmla eval` line, and
both models' greedy continuation of one prompt.

    python benchmarks/quickstart.py --setup --out benchmarks/results     # CPU; about 8 minutes on 2 cores

Writes quickstart.json and quickstart.md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PROMPT = "The capital of France is"


def readme_commands() -> tuple[str, str, str]:
    """The set-up line, the main job and the README's `transmla eval` line."""
    setup_block, using_block = re.findall(r"```bash\n(.*?)```", README, flags=re.S)[:2]
    lines = [line.split("  #")[0].strip() for line in setup_block.splitlines() if line.strip()]
    evaluate = next(line.split("  #")[0].strip() for line in using_block.splitlines() if line.startswith("transmla eval"))
    return lines[0], lines[1], evaluate


def timed(command: str, cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    began = time.perf_counter()
    done = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"`{command}` failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - began, done.stdout


def continuation(folder: str, cwd: Path, env: dict[str, str]) -> str:
    code = ("import sys, torch; from transmla.io.source import load_model; m, t = load_model(sys.argv[1]); "
            f"ids = t({PROMPT!r}, return_tensors='pt'); "
            "out = m.generate(**ids, max_new_tokens=24, do_sample=False); print(t.decode(out[0], skip_special_tokens=True))")
    return subprocess.run([sys.executable, "-c", code, folder], cwd=cwd, env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", action="store_true", help="also time the set-up line in a fresh virtual environment")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    setup, main_job, evaluate = readme_commands()
    work = Path(tempfile.mkdtemp(prefix="transmla-quickstart-"))
    (work / "shared").symlink_to(ROOT.parent / "shared")  # the README's ../shared/data paths
    (work / "main").mkdir()
    env = {**os.environ, "TRANSMLA_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "PIP_NO_CACHE_DIR": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    record: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
                    "load_average_before": os.getloadavg()}
    if args.setup:
        venv = work / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        seconds, _ = timed(setup, ROOT, {**env, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"})  # as the README: in the checkout
        record["setup"] = {"command": setup, "seconds": seconds}
    seconds, printed = timed(main_job, work / "main", env)
    sampled = re.search(r"sampled ([\d,]+) tokens in ([\d.]+) s", printed)
    record["convert"] = {"command": main_job, "seconds": seconds,
                         "sampling_seconds": float(sampled.group(2)) if sampled else None}
    seconds, printed = timed(evaluate + " --json", work / "main", env)
    record["eval"] = {"command": evaluate, "seconds": seconds, "rows": json.loads(printed)}
    folder = shlex.split(main_job)[shlex.split(main_job).index("--out") + 1]
    record["continuations"] = {"original": continuation("smollm2-135m", work / "main", env),
                               "converted": continuation(folder, work / "main", env)}
    subprocess.run(["rm", "-rf", str(work)])
    (args.out / "quickstart.json").write_text(json.dumps(record, indent=1) + "\n")
    rows = record["eval"]["rows"]
    lines = [f"# Quick start on {record['machine']} (load average before: {record['load_average_before'][0]:.2f})", ""]
    if "setup" in record:
        lines.append(f"- `{record['setup']['command']}`: {record['setup']['seconds']:.0f} s (fresh venv, no pip cache)")
    lines += [f"- `{main_job}`: {record['convert']['seconds']:.0f} s ({record['convert']['sampling_seconds']} s of it "
              "sampling the calibration text, an empty cache)",
              f"- `{evaluate}`: {record['eval']['seconds']:.0f} s", "",
              "| model | KV values/token | perplexity | vs original |", "| --- | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| `{row['name']}` | {row['kv_values_per_token']:,} | {row['perplexity']:.2f} | "
                     f"{row['perplexity_ratio']:.3f}x |")
    lines += ["", f"Greedy continuation of \"{PROMPT}\":", "",
              f"- original: {record['continuations']['original']!r}",
              f"- converted: {record['continuations']['converted']!r}", "",
              "Command: `python benchmarks/quickstart.py --setup --out benchmarks/results`", ""]
    (args.out / "quickstart.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
