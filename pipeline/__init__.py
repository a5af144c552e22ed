"""rlsynth pipeline package."""
