"""Gymnasium environments: making them with a clear error, and their spaces in rlsynth's types."""

from __future__ import annotations

from typing import Any

from rlsynth.datasets.errors import SourceError
from rlsynth.datasets.types import BoxSpace, DatasetInfo, check_env_id


def make_env(env_id: str, **kwargs: Any) -> Any:
    """``gymnasium.make`` with a one-line error for unknown ids or missing simulators."""
    import gymnasium

    check_env_id(env_id)
    try:
        return gymnasium.make(env_id, **kwargs)
    except gymnasium.error.Error as e:
        raise SourceError(f"environment '{env_id}' cannot be made: {e}") from None
    except (ImportError, ModuleNotFoundError) as e:
        raise SourceError(f"environment '{env_id}' needs a package that is not installed: {e}") from None


def box_space(space: Any, what: str, env_id: str) -> BoxSpace:
    import gymnasium

    if not isinstance(space, gymnasium.spaces.Box) or len(space.shape) != 1:
        raise SourceError(f"environment '{env_id}': {what} is {space}; rlsynth supports flat Box spaces only")
    return BoxSpace.from_gymnasium(space)


def env_info(env_id: str) -> DatasetInfo:
    """The dataset info implied by an environment: its id and its observation and action spaces."""
    env = make_env(env_id)
    try:
        return DatasetInfo(
            env_id=env_id,
            observation_space=box_space(env.observation_space, "the observation space", env_id),
            action_space=box_space(env.action_space, "the action space", env_id),
        )
    finally:
        env.close()
