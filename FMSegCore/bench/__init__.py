"""FMSegCore.bench."""
