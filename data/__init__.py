"""brainseg data package."""
