"""The shape of a network FMSeg trains, as a checkpoint carries it: plain types only (a ``weights_only`` load
reads it), unknown keys refused, feature widths as a tuple in the dataclass and a list in the file."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any


class NetworkConfig:
    """Base of the networks' config dataclasses (:class:`~FMSegCore.models.iris.IrisConfig`,
    :class:`~FMSegCore.models.refiner3d.RefinerConfig`)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]):  # noqa: ANN206 - the subclass
        unknown = sorted(set(data) - {f.name for f in fields(cls)})  # type: ignore[arg-type]
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(unknown)}")
        values = dict(data)
        if "features" in values:
            values["features"] = tuple(int(f) for f in values["features"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)  # type: ignore[call-overload]
        if "features" in data:
            data["features"] = list(data["features"])
        return data
