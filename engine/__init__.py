"""brainseg engine package."""
