"""How measurements are named and shown: a device as tuned tables key it, milliseconds as
people read them (tuned files' notes, the tuner's reports, benchmarks)."""

from __future__ import annotations

import torch


def format_ms(ms: float) -> str:
    """Milliseconds as people read them: 3 significant digits ('51.5', '0.312'), whole
    numbers from 1000 up ('1310', not '1.31e+03')."""
    return f"{ms:.0f}" if abs(ms) >= 1000 else f"{ms:.3g}"


def device_name(device: torch.device | str) -> str:
    """A device as measurements name it (and tuned files key it): the CUDA device name, or
    its type (``cpu``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type
