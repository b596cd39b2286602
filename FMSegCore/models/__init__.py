"""FMSegCore.models."""
