"""Reading checkpoint files: the bottom layer that models/ and tasks/ both import (it imports neither)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lit_imgcls.errors import UserError


def read_checkpoint(checkpoint: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict, with a clear error for a missing or unreadable file."""
    path = Path(checkpoint)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: train one first or fix the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise UserError(
            f"checkpoint {path} could not be read ({error}): it is truncated or not a PyTorch checkpoint; "
            "use another one (best-*.ckpt or last.ckpt of the same run)"
        ) from error
