"""How arrays travel between the worker and its clients: one binary frame per array.

A frame is ``MAGIC``, a 4-byte little-endian header length, a JSON header (``shape``, ``dtype``, ``encoding``
and free ``meta``), then the C-ordered bytes (raw or zlib). Masks travel as the crop around their voxels, bit
packed and compressed, so a prompt's answer stays a few kilobytes even for a 512x512x500 volume.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from typing import Any, Optional

import numpy as np

MAGIC = b"FMSEG1\n"
#: dtypes accepted in a frame (nothing that needs pickling).
DTYPES = ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "float32", "float64")
ENCODINGS = ("raw", "zlib")
MAX_HEADER_BYTES = 1 << 20
MAX_DIMS = 4
#: The longest side of an array in a frame.
MAX_SIDE = 1 << 31
CONTENT_TYPE = "application/x-fmseg-array"


class WireError(ValueError):
    """A frame that cannot be decoded (the message says why, in one line)."""


def encode_array(array: np.ndarray, meta: Optional[dict[str, Any]] = None, compress: bool = False) -> bytes:
    """One frame holding ``array`` and its JSON-serialisable ``meta``."""
    array = np.ascontiguousarray(array)
    if array.dtype.name not in DTYPES:
        raise WireError(f"arrays of dtype {array.dtype} cannot be sent (use one of {', '.join(DTYPES)})")
    data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    encoding = "zlib" if compress else "raw"
    if compress:
        data = zlib.compress(data, 1)
    header = json.dumps({"shape": list(array.shape), "dtype": array.dtype.name, "encoding": encoding,
                         "meta": meta or {}}).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + data


def decode_array(frame: bytes, max_elements: Optional[int] = None,
                 max_bytes: Optional[int] = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The array and meta of a frame (its data at most ``max_bytes``, once inflated); a malformed frame raises
    :class:`WireError`."""
    if not frame.startswith(MAGIC) or len(frame) < len(MAGIC) + 4:
        raise WireError("not an FMSeg array frame (bad magic bytes)")
    (length,) = struct.unpack_from("<I", frame, len(MAGIC))
    start = len(MAGIC) + 4
    if length > MAX_HEADER_BYTES or start + length > len(frame):
        raise WireError("frame header length is out of range")
    try:
        header = json.loads(frame[start:start + length])
        shape = header["shape"]
        dtype, encoding, meta = str(header["dtype"]), str(header.get("encoding", "raw")), header.get("meta", {})
    except (ValueError, KeyError, TypeError, RecursionError) as error:
        raise WireError(f"frame header is not valid JSON with shape and dtype ({error})") from None
    shape = _shape(shape)
    if dtype not in DTYPES or encoding not in ENCODINGS:
        raise WireError(f"unsupported frame dtype {dtype!r} or encoding {encoding!r}")
    if not isinstance(meta, dict):
        raise WireError(f"frame meta must be a JSON object, not {type(meta).__name__}")
    elements = math.prod(shape)
    if max_elements is not None and elements > max_elements:
        raise WireError(f"array of {elements} elements exceeds the limit of {max_elements}")
    expected = elements * np.dtype(dtype).itemsize
    if max_bytes is not None and expected > max_bytes:
        raise WireError(f"array of {expected} bytes exceeds the limit of {max_bytes} bytes")
    data = frame[start + length:]
    if encoding == "zlib":
        try:  # never inflate past what the header announces (a small frame must not become a huge array)
            data = zlib.decompressobj().decompress(data, expected + 1)
        except zlib.error as error:
            raise WireError(f"frame data does not decompress ({error})") from None
    if len(data) != expected:
        raise WireError(f"frame holds {len(data)} bytes of data, the header announces {expected}")
    array = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    return array.astype(np.dtype(dtype), copy=True), meta


def _shape(value: Any) -> tuple[int, ...]:
    """A header's shape: a list of at most ``MAX_DIMS`` integers from 0 to ``MAX_SIDE``."""
    if not isinstance(value, list) or len(value) > MAX_DIMS or \
            any(isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_SIDE for n in value):
        raise WireError(f"bad array shape {json.dumps(value)[:80]} (a list of at most {MAX_DIMS} integers "
                        f"from 0 to {MAX_SIDE})")
    return tuple(value)


def encode_mask(mask: np.ndarray, meta: Optional[dict[str, Any]] = None) -> bytes:
    """A boolean volume as the bit-packed crop around its voxels (an empty mask: an empty crop)."""
    mask = np.asarray(mask, dtype=bool)
    found = np.argwhere(mask)
    if len(found):
        lo, hi = found.min(axis=0), found.max(axis=0) + 1
    else:
        lo = hi = np.zeros(mask.ndim, dtype=int)
    crop = mask[tuple(slice(a, b) for a, b in zip(lo, hi))]
    packed = np.packbits(crop.ravel())
    info = dict(meta or {}, mask_shape=list(mask.shape), crop_lo=[int(v) for v in lo],
                crop_shape=list(crop.shape))
    return encode_array(packed, info, compress=True)


def decode_mask(frame: bytes) -> tuple[np.ndarray, dict[str, Any]]:
    """The boolean volume of :func:`encode_mask` and its meta."""
    packed, meta = decode_array(frame)
    try:
        shape = tuple(int(n) for n in meta.pop("mask_shape"))
        lo = [int(n) for n in meta.pop("crop_lo")]
        crop_shape = tuple(int(n) for n in meta.pop("crop_shape"))
    except (KeyError, TypeError, ValueError):
        raise WireError("mask frame lacks its shape and crop") from None
    count = int(np.prod(crop_shape, dtype=np.int64))
    if packed.dtype != np.uint8 or packed.size * 8 < count or len(shape) != len(crop_shape) \
            or any(a + n > s for a, n, s in zip(lo, crop_shape, shape)):
        raise WireError("mask frame's crop does not fit its shape")
    mask = np.zeros(shape, dtype=bool)
    if count:
        crop = np.unpackbits(packed)[:count].astype(bool).reshape(crop_shape)
        mask[tuple(slice(a, a + n) for a, n in zip(lo, crop_shape))] = crop
    return mask, meta
