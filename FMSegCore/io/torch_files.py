"""Files written by ``torch.save``: why one cannot be read, in words a user can act on."""

from __future__ import annotations

from pathlib import Path


def unreadable_reason(path: Path, error: BaseException) -> str:
    """Why ``torch.load`` could not read ``path``, in words a user can act on (torch's own messages, such as
    "pop from empty list" for a text file, say nothing useful)."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(4)
    except OSError as problem:
        return f"cannot be read: {problem.strerror or problem}"
    if not head:
        return "the file is empty"
    if head[:2] != b"PK" and head[:1] != b"\x80":
        return "not a PyTorch file (no zip or pickle header)"
    if head[:2] == b"PK":
        return "a damaged or truncated PyTorch file"
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"an unreadable PyTorch file ({text[:160]})"
