"""A tune-model worker on the tiny Llama, run as a process by the resume and sharing tests.

python tests/model_tuning_worker.py OUT STORAGE STUDY TRIALS CACHE
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import tiny_llama

from attncompose.tuner.model_job import ModelTuneConfig, TextInfo, tune_model

SEQ_LEN = 64
LAYERS = 2
SHARED = 3  # model-wide trials per recipe
TINY_RECIPES = {
    "tiny-topk": """\
        name: tiny-topk
        steps:
          sinks: {op: sink, count: {default: 2, choices: [0, 2]}}
          local: {op: window, width: {default: 16, choices: [0, 8, 16, 32]}}
          heavy: {op: topk, block_size: 16, k: {default: 1, low: 0, high: 3}}
          out: {op: block, select: [sinks, local, heavy], block_size: 16}
        """,
    "tiny-stream": """\
        name: tiny-stream
        steps:
          sinks: {op: sink, count: {default: 2, choices: [0, 1, 2, 4]}}
          local: {op: window, width: {default: 16, choices: [0, 8, 16, 32]}}
          out: {op: block, select: [sinks, local], block_size: 16}
        """,
}


def recipe_paths(folder: Path) -> tuple[str, ...]:
    """Where :func:`write_recipes` puts the tiny recipes."""
    return tuple(str(folder / f"{name}.yaml") for name in TINY_RECIPES)


def write_recipes(folder: Path) -> tuple[str, ...]:
    """The tiny recipes as YAML files in ``folder``; their paths."""
    for name, text in TINY_RECIPES.items():
        (folder / f"{name}.yaml").write_text(textwrap.dedent(text))
    return recipe_paths(folder)


def text_ids(segments: int = 3) -> TextInfo:
    """A random 'text' of token ids for the tiny model (``segments`` x SEQ_LEN tokens)."""
    ids = torch.randint(3, 128, (1, segments * SEQ_LEN), generator=torch.Generator().manual_seed(0))
    return TextInfo("random ids", "5eed" * 16, ids)


def config(out: Path, cache: Path, **changes) -> ModelTuneConfig:
    """A small tuning of the tiny model: both tiny recipes (written beside ``out`` by
    :func:`write_recipes`), products, torch backend."""
    base = {
        "seq_len": SEQ_LEN,
        "recipes": recipe_paths(out.parent),
        "target_err": 0.5,
        "trials": 4,
        "shared_trials": SHARED,
        "cost": "products",
        "backend": "torch",
        "cache": cache,
        "out": out,
    }
    return ModelTuneConfig(**{**base, **changes})


def main() -> None:
    out, storage, study, trials, cache = sys.argv[1:6]
    layers = int(sys.argv[6]) if len(sys.argv) > 6 else LAYERS
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = config(Path(out), Path(cache), storage=storage, study=study, trials=int(trials))
    tune_model(tiny_llama(layers), "tiny", text_ids(), cfg)


if __name__ == "__main__":
    main()
