"""rlsynth datasets package."""
