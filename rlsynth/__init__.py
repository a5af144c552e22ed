"""rlsynth: offline-RL data synthesis.

The design card keeps the layers as folders at the repository root (``datasets/``, ``generators/``,
``guidance/``, ``offline_rl/``, ``pipeline/``); this package links them under one import name, so an
installed rlsynth is ``rlsynth.datasets`` and so on and never shadows Hugging Face ``datasets`` or any
other top-level package.
"""

__version__ = "0.1.0"
