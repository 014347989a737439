"""Generating text with SmolLM2-135M on the CPU: exact attention against recipes and tunings.

What a user of a tuned file sees in a generation loop: a prompt of ``--prompt`` tokens (the
first tokens of ``--text``, by default ``stdlib-docs``: not the text the tunings were made
on), then ``--new`` tokens chosen greedily, one forward step each with the KV cache (each
layer's attention a decode step: one query after every key). Per implementation:

- ``prefill_ms``: the prompt's forward pass; ``step_ms``: the median decode step (the whole
  model, one token); ``tokens_per_s`` from it;
- ``same_tokens``: how many of the generated tokens equal exact attention's before the first
  that differs (greedy: one different token changes the rest); ``new``: of how many.

Implementations: ``sdpa`` (transformers' own), ``exact`` (attncompose's exact attention
registered as the model's attention), each ``--recipes`` recipe on every layer at its default
knobs, and each ``--tuned`` file (a model-level tuning, or a tuned recipe file) with its
decode steps as tuned (``decode_fallback``: exact attention where the tuner measured the
choice's decode step no faster) and, as ``...:choice``, with its choice at every step.
Rounds interleave the implementations (drifts hit all alike); medians over ``--repeats``
rounds. Writes ``benchmarks/results/bench_generate_cpu.json`` (device, versions, commit).

The default tuning, ``benchmarks/results/generate/smollm2-n4096-target-err0.05.model-tuned.yaml``,
was made by ``attncompose tune-model --model smollm2 --seq-len 4096 --recipes
topp,block-topk,streaming --target-err 0.05 --shared-trials 16 --trials 4 --cost products``
at 6825c97, which times each choice's decode step beside exact attention's (the tunings in
``results/tuned/`` predate those timings: their choices run at every step).

    python benchmarks/bench_generate_cpu.py [--prompt 4000] [--new 32] [--tuned FILE,...]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
import warnings
from pathlib import Path

import torch

import attncompose as ac
from attncompose.eval.timing import write_results
from attncompose.integrations.hf import attention_implementation, register
from attncompose.models import load_model
from attncompose.models.text import load_text, text_name, text_sha256, token_ids

RESULTS = Path(__file__).parent / "results"
TUNED = RESULTS / "generate" / "smollm2-n4096-target-err0.05.model-tuned.yaml"


class _Stamps:
    """A logits processor that notes the time at each generated token's logits: the first
    after the prompt's forward pass, each next after one decode step."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def generate(model, ids: torch.Tensor, new: int) -> tuple[list[int], float, list[float]]:
    """Greedy tokens after ``ids`` (``model.generate``, KV cache), the prefill's ms and each
    decode step's ms."""
    stamps = _Stamps()
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(
            ids,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            logits_processor=[stamps],
            attention_mask=torch.ones_like(ids),
        )
    times = [start, *stamps.times]
    ms = [(b - a) * 1e3 for a, b in itertools.pairwise(times)]
    return out[0, ids.shape[1] :].tolist(), ms[0], ms[1:]


def implementations(recipes: list[str], tuned: list[str]) -> dict[str, str]:
    """Label -> attention implementation name (registered here; "sdpa" is transformers')."""
    names = {"sdpa": "sdpa", "exact": register("ac-bench-exact", ac.compile("exact"))}
    for recipe in recipes:
        names[recipe] = register(f"ac-bench-{recipe}", ac.compile(recipe))
    for path in tuned:
        label = Path(path).name.removesuffix(".yaml")
        names[label] = register(f"ac-bench-{label}", ac.load(path))
        kept = ac.load(path, decode_fallback=False)
        names[f"{label}:choice"] = register(f"ac-bench-{label}:choice", kept)
    return names


def bench(model, ids: torch.Tensor, names: dict[str, str], new: int, repeats: int) -> list[dict]:
    runs: dict[str, list[tuple[list[int], float, list[float]]]] = {label: [] for label in names}
    for round_ in range(repeats + 1):  # round 0 warms every implementation up
        for label, name in names.items():
            with attention_implementation(model, name), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a tuning's notes (said once per process)
                result = generate(model, ids, new)
            if round_:
                runs[label].append(result)
    reference = runs["sdpa"][0][0]
    rows = []
    for label, results in runs.items():
        tokens = results[0][0]
        prefills = [r[1] for r in results]
        steps = [statistics.median(r[2]) for r in results]  # a round's median decode step
        step_ms = statistics.median(steps)
        pairs = enumerate(zip(tokens, reference, strict=True))
        same = next((i for i, (a, b) in pairs if a != b), new)
        rows.append(
            {
                "impl": label,
                "prefill_ms": statistics.median(prefills),
                "step_ms": step_ms,
                "tokens_per_s": 1e3 / step_ms,
                "same_tokens": same,
                "new": new,
                "same_every_round": all(r[0] == tokens for r in results),
                "prefill_samples_ms": prefills,
                "step_samples_ms": steps,
            }
        )
        print(
            f"{label:48s} prefill {rows[-1]['prefill_ms']:8.0f} ms  step {step_ms:7.1f} ms  "
            f"({rows[-1]['tokens_per_s']:5.1f} tokens/s)  same tokens {same}/{new}",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=4000, help="prompt tokens")
    parser.add_argument("--new", type=int, default=32, help="tokens generated")
    parser.add_argument("--text", default="stdlib-docs")
    parser.add_argument("--recipes", default="streaming")
    parser.add_argument("--tuned", default=str(TUNED), help="tuned files, comma-separated")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_generate_cpu.json")
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2")
    text = load_text(args.text)
    ids = token_ids(tokenizer, args.prompt, text)
    recipes = [r for r in args.recipes.split(",") if r]
    tuned = [t for t in args.tuned.split(",") if t]
    rows = bench(model, ids, implementations(recipes, tuned), args.new, args.repeats)
    record = {
        "benchmark": "bench_generate_cpu",
        "model": "smollm2",
        "dtype": "float32",
        "prompt_tokens": args.prompt,
        "new_tokens": args.new,
        "text": text_name(args.text),
        "text_sha256": text_sha256(text),
        "tuned": [str(Path(t)) for t in tuned],
        "repeats": args.repeats,
        "rows": rows,
    }
    write_results(args.out, record, "cpu")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
