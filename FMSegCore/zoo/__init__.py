"""FMSegCore.zoo."""
