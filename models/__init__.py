"""brainseg models package."""
