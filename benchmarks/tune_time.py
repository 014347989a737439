"""Time README's first command (the main job, after the install), end to end in its own process.

Reads the `attncompose tune ...` part of the first bash block of README.md, runs it in a
temporary folder (arguments given here are appended and win over README's, e.g. a shorter
``--seq-lens`` in tests), and writes to benchmarks/results/tune_time_cpu.json how long it
took, its CPU time (user + system: on a shared machine the wall time grows with the load,
the CPU time much less), the machine's load as it began, and what it chose per length (the
tuned file's entries and the command's conclusion lines). Usage:

    python benchmarks/tune_time.py [--out FILE] [-- EXTRA TUNE ARGUMENTS]
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from attncompose.eval.timing import write_results
from attncompose.runtime.tuned import read_tuned

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"


def readme_command(readme: Path = ROOT / "README.md") -> list[str]:
    """The arguments of the `attncompose tune` in README's first bash block."""
    block = re.search(r"```bash\n(.*?)```", readme.read_text(), re.S)
    if block is None:
        raise SystemExit(f"{readme}: no bash block")
    for part in block[1].split("&&"):
        words = part.split()
        if words and words[0].endswith("attncompose") and words[1:2] == ["tune"]:
            return words[1:]
    raise SystemExit(f"{readme}: its first bash block runs no `attncompose tune`")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "tune_time_cpu.json")
    parser.add_argument("extra", nargs="*", help="arguments appended to README's command")
    args = parser.parse_args()
    command = readme_command() + args.extra
    with tempfile.TemporaryDirectory() as tmp:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "attncompose.cli", *command],
            cwd=tmp,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise SystemExit(f"`attncompose {' '.join(command)}` failed:\n{done.stderr[-2000:]}")
        tuned = read_tuned(Path(tmp) / _out_name(command, Path(tmp)))
    entries = {n: e.model_dump(mode="json") for n, e in tuned.table["cpu"].items()}
    lines = [line for line in done.stdout.splitlines() if re.match(r"n=\d+: ", line)]
    record = {
        "benchmark": "tune_time",
        "command": "attncompose " + " ".join(command),
        "seconds": seconds,
        "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "goal_seconds": 60,
        "entries": entries,
        "entry": next(iter(entries.values())),
        "conclusion": " ".join(lines),
    }
    written = write_results(args.out, record, "cpu")
    shown = ("seconds", "cpu_seconds", "load_1min")
    print(json.dumps({k: written[k] for k in shown}), record["conclusion"])


def _out_name(command: list[str], folder: Path) -> str:
    """The tuned file the command wrote (its --out, else the only *.tuned.yaml/tuned.yaml)."""
    if "--out" in command:
        return command[len(command) - 1 - command[::-1].index("--out") + 1]
    (path,) = [p for p in folder.iterdir() if p.name.endswith("tuned.yaml")]
    return path.name


if __name__ == "__main__":
    main()
