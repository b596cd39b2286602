"""Device choice (CUDA first, then Apple MPS, then CPU) and CPU runtime tuning. Torch is imported when a
function runs, so that the CLI's parser (which names the device choices) starts without it."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import TYPE_CHECKING, Optional, Union

from FMSegCore.errors import FMSegError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: Union[str, torch.device, None] = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device that is absent is an error."""
    import torch

    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FMSegError("device 'cuda' requested but no CUDA GPU is available to this PyTorch build "
                         f"(torch {torch.__version__}); use --device cpu or install a CUDA build of PyTorch")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise FMSegError("device 'mps' requested but Apple MPS is not available; use --device cpu")
    if name.split(":")[0] not in DEVICE_CHOICES[1:]:
        raise FMSegError(f"unknown device '{name}' (choose one of {', '.join(DEVICE_CHOICES)})")
    return torch.device(name)


def inference_dtype(device: torch.device, precision: str = "auto") -> Optional[torch.dtype]:
    """The autocast dtype for inference: bf16/fp16 on CUDA, none (fp32) elsewhere unless asked."""
    import torch

    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


_TUNED = False
#: Environment variable with the number of CPU threads (``fmseg --threads`` sets it); OMP_NUM_THREADS is read next.
THREADS_ENV = "FMSEG_THREADS"


def usable_cores() -> int:
    """The cores this process may run on."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def default_threads(cores: Optional[int] = None, load: Optional[float] = None) -> int:
    """Threads when none is asked for: the cores that other work (the 1-minute load average) leaves idle, at
    least one. On a busy machine fewer threads than cores run much faster than all of them fighting for cores."""
    cores = usable_cores() if cores is None else cores
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, cores - int(load + 0.5)))


def chosen_threads(requested: Optional[int] = None) -> tuple[int, str]:
    """The CPU threads to use and why: ``requested`` (``--threads``), else ``FMSEG_THREADS``, else
    ``OMP_NUM_THREADS``, else :func:`default_threads`. A value that is not a positive whole number is a
    one-line :class:`FMSegError`."""
    if requested is not None:
        if requested < 1:
            raise FMSegError(f"--threads must be at least 1, not {requested}")
        return requested, "--threads"
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        text = os.environ.get(name, "").strip()
        if text:
            if not text.isdigit() or int(text) < 1:
                raise FMSegError(f"{name}={text!r} is not a positive whole number of threads")
            return int(text), name
    return default_threads(), "idle cores"


def tune_cpu_runtime(threads: Optional[int] = None) -> None:
    """Set torch's CPU threads (:func:`chosen_threads`) and keep large buffers in the heap between layers
    (glibc), once per process.

    Feature maps of tens of MB are otherwise returned to the OS after each layer and page-faulted back in,
    which costs a sizeable share of an encoder pass on CPU. Call this from a CLI or worker, not from a library
    user's process that wants its default allocator.
    """
    global _TUNED
    if _TUNED:
        return
    _TUNED = True
    import torch

    torch.set_num_threads(chosen_threads(threads)[0])
    libc_name = ctypes.util.find_library("c")
    if not libc_name or "libc" not in libc_name:
        return
    try:
        libc = ctypes.CDLL(libc_name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 1 << 30)
    mallopt(m_trim_threshold, (1 << 31) - 1)
