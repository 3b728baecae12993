"""Small reinforcement-learning environments (the ``rl`` extra: gymnasium).

:class:`JuiceEnv` is a one-step task: each episode the agent sees juice with probability ``S``;
the observation is ``[juice_visible, d_1, …, d_D]`` where the ``D`` distractor features are one
of ``K`` fixed vectors (the *distractor bank*, ``N(0, distractor_scale²)`` entries drawn once
from ``seed``) picked uniformly at
random each episode. The action is 1 (approach) or 0 (stay); the reward is 1 for approaching
juice that is visible, else 0. For a policy ``π(o) = P(approach | o)`` the expected reward is
exactly

    R = S · A,      A = (1/K) Σ_k π([1, bank_k])

the approach probability averaged over the ``K`` juice-visible observations.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

__all__ = ["JuiceEnv"]


class JuiceEnv(gym.Env):
    """One-step juice task (see the module docstring); ``step`` always ends the episode.

    ``observation_space`` is ``Box(-inf, inf, (1 + D,), float64)`` (the first entry is 0 or 1);
    ``action_space`` is ``Discrete(2)``. :meth:`sample_observations` and :meth:`rewards` draw and
    score many episodes at once with the same distribution and reward as ``reset``/``step``.
    """

    metadata = {"render_modes": []}  # noqa: RUF012 (gymnasium declares it an instance variable)

    def __init__(
        self,
        juice_probability: float,
        *,
        distractors: int = 4,
        bank_size: int = 16,
        distractor_scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= juice_probability <= 1.0:
            raise ValueError(
                f"JuiceEnv: juice_probability must be in [0, 1], got {juice_probability}."
            )
        if distractors < 0 or bank_size < 1:
            raise ValueError(
                "JuiceEnv: need distractors >= 0 and bank_size >= 1, "
                f"got {distractors}, {bank_size}."
            )
        self.juice_probability = float(juice_probability)
        rng = np.random.default_rng(seed)
        self.bank = distractor_scale * rng.standard_normal((bank_size, distractors))
        self.observation_space = spaces.Box(-np.inf, np.inf, (1 + distractors,), np.float64)
        self.action_space = spaces.Discrete(2)
        self._observation: np.ndarray | None = None

    def juice_observations(self) -> np.ndarray:
        """The ``K`` observations with juice visible, ``[K, 1 + D]`` (``A`` averages over them)."""
        return np.concatenate([np.ones((len(self.bank), 1)), self.bank], axis=1)

    def sample_observations(self, count: int) -> np.ndarray:
        """``count`` independent observations, ``[count, 1 + D]``, drawn with ``self.np_random``."""
        rng = self.np_random
        visible = (rng.random(count) < self.juice_probability).astype(np.float64)
        picks = rng.integers(0, len(self.bank), size=count)
        return np.concatenate([visible[:, None], self.bank[picks]], axis=1)

    @staticmethod
    def rewards(observations: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Reward 1 where juice is visible (``obs[..., 0] = 1``) and the action is 1, else 0."""
        return ((observations[..., 0] > 0.5) & (np.asarray(actions) == 1)).astype(np.float64)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._observation = self.sample_observations(1)[0]
        return self._observation.copy(), {"juice_visible": bool(self._observation[0] > 0.5)}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._observation is None:
            raise ValueError("JuiceEnv.step: call reset() first (every episode is one step).")
        if not self.action_space.contains(action):
            raise ValueError(f"JuiceEnv.step: action must be 0 or 1, got {action!r}.")
        observation, self._observation = self._observation, None
        reward = float(self.rewards(observation, np.asarray(int(action))))
        return observation.copy(), reward, True, False, {}
