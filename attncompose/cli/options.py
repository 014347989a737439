"""What every command shares: user mistakes become one line on stderr and exit status 2, and
the options several commands take (data, backend, device, lists of lengths)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from attncompose.errors import AttncomposeError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


def user_errors(fn):
    """Turn the library's user-facing errors into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (AttncomposeError, OSError) as err:  # OSError: a file or folder it names
            click.echo(f"error: {err}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt as err:  # Ctrl-C: what was kept, if anything, not a traceback
            click.echo(f"interrupted{': ' + str(err) if str(err) else ''}", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except (MemoryError, RuntimeError) as err:
            if not _out_of_memory(err):
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            click.echo(f"error: out of memory (try shorter sequences): {first}", err=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


def _out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (CPU or CUDA), not a bug."""
    import torch

    text = str(err).lower()
    return (
        isinstance(err, (MemoryError, torch.OutOfMemoryError))
        or "can't allocate memory" in text
        or "out of memory" in text
    )


def parse_lengths(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    """click callback: '4096,8192' -> (4096, 8192), positive and without repeats."""
    try:
        lengths = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not lengths or min(lengths) < 1:
        raise click.BadParameter(f"expected positive lengths, got {value!r}")
    return tuple(dict.fromkeys(lengths))


def parse_device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """click callback: a torch device this machine has ('cpu', 'cuda', 'cuda:1'), or None."""
    if value is None:
        return None
    import torch

    try:
        device = torch.device(value)
    except RuntimeError:
        raise click.BadParameter(
            f"not a torch device: {value!r} (e.g. cpu, cuda, cuda:1)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no GPU found"
            raise click.BadParameter(f"{value!r}: CUDA is not available here ({why})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise click.BadParameter(
                f"{value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type != "cpu":
        raise click.BadParameter(f"{value!r}: only cpu and cuda devices are supported")
    return value


def device_option(help: str):
    """--device, checked against what this machine has (default None: the command decides)."""
    return click.option("--device", default=None, callback=parse_device, help=help)


data_option = click.option(
    "--data",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Captured Q/K/V (safetensors, from `attncompose capture`), or 'synthetic' for "
    "structured random tensors (not real attention); default: the built-in capture (4096 "
    "tokens of SmolLM2).",
)
backend_option = click.option(
    "--backend",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "torch", "triton", "flex"]),
)
causal_option = click.option(
    "--causal/--no-causal",
    default=True,
    show_default=True,
    help="Causal attention (as language models attend; bottom-right aligned) or non-causal.",
)


def cost_option(help: str):
    """--cost: what a tuning run minimises."""
    return click.option(
        "--cost",
        type=click.Choice(["latency", "products"]),
        default="latency",
        show_default=True,
        help=help,
    )


seed_option = click.option("--seed", type=int, default=0, show_default=True, help="Sampler seed.")


def storage_options(storage_help: str, study_help: str):
    """--storage and --study: where a tuning run's trials live, shared by workers."""
    storage = click.option(
        "--storage",
        default=None,
        help=f"{storage_help}: sqlite:///FILE, postgresql://..., or journal:PATH "
        "[default: a SQLite file beside --out].",
    )
    study = click.option("--study", default=None, help=study_help)
    return lambda fn: storage(study(fn))
