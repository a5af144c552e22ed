"""rlsynth generators package."""
