"""Option values the methods share."""
from __future__ import annotations

import torch


def float_dtype(value, option: str = "adapter_dtype") -> torch.dtype | None:
    """The floating torch dtype that ``value`` (a torch.dtype, or its name: "bfloat16",
    "torch.float32") names; None stays None. ``option`` names the option in the error."""
    if value is None or isinstance(value, torch.dtype):
        return value
    dt = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"{option} must be a floating torch dtype (or its name), got {value!r}")
    return dt
