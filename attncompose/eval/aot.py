"""Compiling the Triton kernels a call launches for a GPU that is not here.

Triton compiles ahead of time for a named target (``GPUTarget("cuda", 90, 32)``: Hopper)
with no GPU present: its frontend, MLIR passes, LLVM and the ptxas it ships all run on the
CPU. :class:`LaunchRecorder` watches a call under ``TRITON_INTERPRET=1`` (see
:mod:`.interpreter`) and keeps each distinct kernel variant it launches: the kernel, its
arguments' types and its constexpr values. :func:`compile_variants` compiles them for the
target in a process where the kernels are JIT functions (``TRITON_INTERPRET`` unset: the
interpreter's kernels cannot be compiled), a variant launched through an autotuner once per
config its pruning keeps for the recorded launch (what the autotuner would compile on the
GPU for those block sizes), and reports per compile whether it worked, its shared memory,
registers and spills (``cuobjdump`` of the cubin) and which tensor-core and asynchronous-copy
instructions it uses (the PTX). What it cannot say: speed, and whether the compiled code
computes the right thing (the GPU tests do).

A variant is compiled as the JIT would specialize the recorded launch (:func:`specialization`):
an integer argument equal to 1 (a unit stride) becomes the constant 1, integers divisible by
16 and 16-byte aligned pointers are compiled as such. Without that a kernel reads every
element through a runtime stride (no vector loads, no ``cp.async`` pipelining), which is not
what runs on the GPU.

    recorder = LaunchRecorder()
    with recorder:
        attn(q, k, v, is_causal=True)
    results = compile_variants(recorder.variants)   # [{"kernel": ..., "ok": ...}, ...]
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from attncompose.eval.interpreter import CallWatch

TARGET = ("cuda", 90, 32)  # Hopper (H100/H200): the GPUs this project is measured on
DTYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}


class LaunchRecorder(CallWatch):
    """Keeps each distinct Triton kernel variant a call launches (see the module doc):
    ``variants``, a list of dicts {"module", "kernel", "signature", "constexprs",
    "specialized", "tuning"}: the argument types (``*bf16``, ``i32``, ...), the constexpr
    values by name, how the JIT specializes the other arguments (name -> "1" or "D", see
    :func:`specialization`), and the values of the arguments its autotuner keys on (they
    decide which configs it keeps)."""

    def __init__(self) -> None:
        super().__init__()
        self.variants: list[dict] = []
        self._seen: set[str] = set()

    def launch(self, kernel, args, kwargs) -> None:
        fn = kernel.fn
        bound = inspect.getcallargs(fn, *args, **kwargs)
        tuner = tuner_of(sys.modules[fn.__module__], fn)
        keys = () if tuner is None else tuner.keys
        signature, constexprs, specialized, tuning = {}, {}, {}, {}
        for name in kernel.arg_names:
            value = bound[name]
            if name in kernel.constexprs:
                constexprs[name] = value
                continue
            signature[name] = _type_of(name, value)
            if specialization(value):
                specialized[name] = specialization(value)
            if name in keys:
                tuning[name] = value
        variant = {
            "module": fn.__module__,
            "kernel": fn.__name__,
            "signature": signature,
            "constexprs": constexprs,
            "specialized": specialized,
            "tuning": tuning,
        }
        key = json.dumps(variant, sort_keys=True)
        if key not in self._seen:
            self._seen.add(key)
            self.variants.append(variant)


def tuner_of(module, fn):
    """The autotuner in ``module`` that wraps the kernel whose Python function is ``fn``
    (a JIT function's or the interpreter's, which may rewrite it: matched by name), or
    None."""
    for x in vars(module).values():
        wrapped = getattr(getattr(x, "fn", None), "fn", None)
        if hasattr(x, "configs") and getattr(wrapped, "__qualname__", None) == fn.__qualname__:
            return x
    return None


def specialization(value: Any) -> str:
    """How Triton's JIT specializes a launch argument (its rule for arguments without
    ``do_not_specialize``): "1" for an integer equal to 1 (compiled as that constant), "D"
    for an integer divisible by 16 or a tensor whose data is 16-byte aligned (compiled with
    that divisibility), "" otherwise (bools, floats and other values)."""
    if isinstance(value, torch.Tensor):
        return "D" if value.data_ptr() % 16 == 0 else ""
    if isinstance(value, int) and not isinstance(value, bool):
        return "1" if value == 1 else "D" if value % 16 == 0 else ""
    return ""


def _type_of(name: str, value: Any) -> str:
    if isinstance(value, torch.Tensor):
        if value.dtype not in DTYPES:
            raise TypeError(f"argument {name}: no Triton type for dtype {value.dtype}")
        return "*" + DTYPES[value.dtype]
    if isinstance(value, bool):
        return "u1"  # as the JIT types a bool
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"argument {name}: no Triton type for {type(value).__name__}")


def compile_variants(
    variants: list[dict],
    half: str | None = None,
    every_config: bool = True,
    timeout_s=1800,
    triton_path: str | None = None,
) -> list[dict]:
    """Each variant compiled for :data:`TARGET` in a fresh process (see the module doc): one
    result dict per (variant, config) with "kernel", "constexprs", "num_warps",
    "num_stages", "ok", "error" (when not ok), "seconds", "shared_bytes", "registers",
    "spill_bytes", "instructions" (counts of :data:`INSTRUCTIONS`), "triton" (the version
    that compiled it: ``triton_path``'s, a folder with another Triton installed, e.g. by
    ``pip install --target DIR --no-deps triton==X``, else this environment's). ``half``: compile
    float16 tensors as this type ("bf16": the interpreter runs no bfloat16, the GPU runs it);
    ``every_config`` False: one config per variant and kind of loads (the first its
    autotuner keeps)."""
    if half is not None:
        variants = [_retyped(v, "*fp16", "*" + half) for v in variants]
    with tempfile.TemporaryDirectory() as tmp:
        given, got = Path(tmp) / "variants.json", Path(tmp) / "results.json"
        given.write_text(json.dumps(variants))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
        env["TRITON_CACHE_DIR"] = str(Path(tmp) / "cache")  # every compile runs: true seconds
        if triton_path is not None:  # found before this environment's Triton
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [triton_path, env.get("PYTHONPATH")]))
        done = subprocess.run(
            [sys.executable, "-m", "attncompose.eval.aot", str(given), str(got)]
            + ([] if every_config else ["one"]),
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if done.returncode != 0:
            raise RuntimeError(f"the compile process failed:\n{done.stderr[-3000:]}")
        return json.loads(got.read_text())


def _retyped(variant: dict, old: str, new: str) -> dict:
    signature = {k: new if t == old else t for k, t in variant["signature"].items()}
    return {**variant, "signature": signature}


def _configs(module, jit_fn, variant: dict) -> list[tuple[dict, int | None, int | None]]:
    """(constexprs, num_warps, num_stages) to compile: one per config that the autotuner
    wrapping ``jit_fn`` keeps for the recorded launch, else the recorded launch alone."""
    tuner = tuner_of(module, jit_fn.fn)
    if tuner is None:
        return [(variant["constexprs"], None, None)]
    configs = tuner.configs
    if tuner.early_config_prune is not None:
        named = {**variant["tuning"], **variant["constexprs"]}
        configs = tuner.early_config_prune(configs, named)
    tuned = set().union(*(c.kwargs for c in configs))
    fixed = {k: v for k, v in variant["constexprs"].items() if k not in tuned}
    return [({**fixed, **c.kwargs}, c.num_warps, c.num_stages) for c in configs]


def _compile_one(
    jit_fn, signature: dict, constexprs: dict, warps, stages, specialized: dict | None = None
) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = jit_fn.arg_names
    constexprs, attrs = _specialize(jit_fn, constexprs, specialized or {})
    sig = {n: ("constexpr" if n in constexprs else signature[n]) for n in names}
    fixed = {(names.index(n),): v for n, v in constexprs.items()}
    options = {k: v for k, v in (("num_warps", warps), ("num_stages", stages)) if v}
    started = time.perf_counter()
    try:
        out = triton.compile(
            ASTSource(jit_fn, sig, constexprs=fixed, attrs=attrs),
            target=GPUTarget(*TARGET),
            options=options,
        )
    except Exception as err:  # a compile error is the finding: report it, go on
        lines = [x for x in str(err).strip().splitlines() if x.strip()]
        return {"ok": False, "error": " | ".join(lines[-6:])[:1500]}
    result = {
        "ok": True,
        "seconds": round(time.perf_counter() - started, 2),
        "shared_bytes": out.metadata.shared,
    }
    return result | _resources(out.asm["cubin"]) | {"instructions": _instructions(out.asm["ptx"])}


def _specialize(jit_fn, constexprs: dict, specialized: dict) -> tuple[dict, dict]:
    """The recorded specializations (see :func:`specialization`) as the JIT applies them to
    ``jit_fn``'s parameters (none where a parameter says ``do_not_specialize``): (constexprs
    with the arguments equal to 1, attrs {(index,): [["tt.divisibility", 16]]})."""
    constexprs, attrs = dict(constexprs), {}
    for i, param in enumerate(jit_fn.params):
        kind = specialized.get(param.name, "")
        if not kind or param.do_not_specialize:
            continue
        if kind == "1":
            constexprs[param.name] = 1
        elif not param.do_not_specialize_on_alignment:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return constexprs, attrs


# PTX instructions counted per compile: Hopper's warpgroup MMA, the warp-level MMA of
# earlier GPUs (what small tiles fall back to), cp.async (software-pipelined loads) and
# bulk copies (TMA)
INSTRUCTIONS = {
    "wgmma": r"\bwgmma\.mma_async",
    "mma_sync": r"\bmma\.sync",
    "cp_async": r"\bcp\.async\.c[ag]\b",
    "tma": r"\bcp\.async\.bulk",
}


def _instructions(ptx: str) -> dict[str, int]:
    """How many of each of :data:`INSTRUCTIONS` the PTX holds (static counts)."""
    return {name: len(re.findall(pattern, ptx)) for name, pattern in INSTRUCTIONS.items()}


def _resources(cubin: bytes) -> dict:
    """Registers and spilled bytes (stack and local memory) per thread, from ``cuobjdump``."""
    from triton.backends.nvidia import __file__ as nvidia

    tool = Path(nvidia).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    found = {k: re.search(rf"{k}:(\d+)", text) for k in ("REG", "STACK", "LOCAL")}
    if not all(found.values()):
        return {"registers": None, "spill_bytes": None}
    value = lambda k: int(found[k].group(1))
    return {"registers": value("REG"), "spill_bytes": value("STACK") + value("LOCAL")}


def _main(given: str, got: str, configs: str = "every") -> None:
    """The compile process: variants from ``given``, results to ``got`` (JSON); ``configs``
    "one": the first config per variant and kind of loads (pointers, tensor descriptors)."""
    import triton

    results = []
    for variant in json.loads(Path(given).read_text()):
        module = importlib.import_module(variant["module"])
        jit_fn = getattr(module, variant["kernel"])
        kept = _configs(module, jit_fn, variant)
        if configs == "one":
            firsts = {}
            for config in kept:
                firsts.setdefault(config[0].get("TMA"), config)
            kept = list(firsts.values())
        for constexprs, warps, stages in kept:
            row = {
                "kernel": f"{variant['module']}.{variant['kernel']}",
                "constexprs": constexprs,
                "num_warps": warps,
                "num_stages": stages,
                "triton": triton.__version__,
            }
            row |= _compile_one(
                jit_fn,
                variant["signature"],
                constexprs,
                warps,
                stages,
                variant.get("specialized"),
            )
            results.append(row)
    Path(got).write_text(json.dumps(results))


if __name__ == "__main__":
    _main(*sys.argv[1:])
