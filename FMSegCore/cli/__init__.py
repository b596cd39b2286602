"""FMSegCore.cli."""
