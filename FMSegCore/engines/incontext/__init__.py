"""In-context segmentation: a support set of labelled examples defines the task; no training."""

from FMSegCore.engines.incontext.session import InContextResult, InContextSession, InContextSettings
from FMSegCore.engines.incontext.support import (
           SupportExample,
           SupportSet,
           example_from_arrays,
           load_support_set,
)

__all__ = ["InContextResult", "InContextSession", "InContextSettings", "SupportExample", "SupportSet",
           "example_from_arrays", "load_support_set"]
