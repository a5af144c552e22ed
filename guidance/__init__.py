"""rlsynth guidance package."""
