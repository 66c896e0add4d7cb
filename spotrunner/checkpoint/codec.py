"""Checkpoint bytes: one plain dict serialised by torch.save, verified before it is loaded.

Loading uses `torch.load(weights_only=True)`, which refuses anything but tensors, plain
containers and scalars, so a checkpoint can never execute pickled code. The sha256 and
size in the commit record are checked first: a torn or tampered blob is never decoded.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import torch

from spotrunner.errors import CorruptCheckpoint


def encode(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode(data: bytes, *, sha256: str, size: int, where: str) -> dict[str, Any]:
    """The state dict in `data` after checking size and sha256; CorruptCheckpoint otherwise."""
    if len(data) != size:
        raise CorruptCheckpoint(f"{where}: {len(data)} bytes, commit record says {size} (torn write)")
    actual = digest(data)
    if actual != sha256:
        raise CorruptCheckpoint(f"{where}: sha256 {actual[:12]}… does not match the commit record's {sha256[:12]}…")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # any decoding failure means the blob is unusable
        raise CorruptCheckpoint(f"{where}: cannot be decoded ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"{where}: holds {type(state).__name__}, not a checkpoint dict")
    return state


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """DESIGN.md's digest: sha256 of the raw bytes of each tensor, in state_dict order, names excluded."""
    hasher = hashlib.sha256()
    for tensor in state_dict.values():
        flat = tensor.detach().cpu().contiguous()
        hasher.update(flat.view(-1).view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return hasher.hexdigest()
