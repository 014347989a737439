"""Time to tune one length on CPU: hyperattention, n=4096, 40 trials, target 0.05 (goal < 60 s).

Writes benchmarks/results/tune_time_cpu.json. Usage:
    python benchmarks/tune_time.py [--seq-len 4096] [--trials 40] [--target-err 0.05]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import optuna

from attncompose.timing import write_results
from attncompose.tuner import TuneConfig, tune

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="hyperattention")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--target-err", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=RESULTS / "tune_time_cpu.json")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        config = TuneConfig(
            target_err=args.target_err,
            seq_lens=(args.seq_len,),
            trials=args.trials,
            device="cpu",
            out=Path(tmp) / "tuned.yaml",
        )
        start = time.perf_counter()
        result = tune(args.recipe, config)
        seconds = time.perf_counter() - start
    entry = result.tuned.table["cpu"][args.seq_len]
    trials = result.trials[result.recipes[0]][args.seq_len]
    record = {
        "benchmark": "tune_time",
        "recipe": args.recipe,
        "seq_len": args.seq_len,
        "trials": args.trials,
        "target_err": args.target_err,
        "seconds": seconds,
        "goal_seconds": 60,
        "pruned": sum(t.state.name == "PRUNED" for t in trials),
        "reused": sum("same_as" in t.user_attrs for t in trials),
        "entry": entry.model_dump(mode="json"),
    }
    write_results(args.out, record, "cpu")
    print(json.dumps({k: record[k] for k in ("seconds", "pruned", "reused")}), entry.fallback)


if __name__ == "__main__":
    main()
