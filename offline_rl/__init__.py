"""rlsynth offline_rl package."""
