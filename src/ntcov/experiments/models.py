"""Small models for the experiments and benchmarks on 8×8 digits."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["digits_cnn", "digits_mlp"]


def digits_mlp(
    *,
    hidden: int = 64,
    depth: int = 2,
    num_classes: int = 10,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> nn.Sequential:
    """``64 → hidden (tanh) → … → num_classes`` with ``depth`` hidden layers, in eval mode."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = 64
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.Tanh()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers).to(dtype).eval()


CNN_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


def digits_cnn(
    *,
    channels: int = 16,
    num_classes: int = 10,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    activation: str = "relu",
) -> nn.Sequential:
    """A small CNN for ``[N, 1, 8, 8]`` digits: two 3×3 convolutions, pooling, a linear head.

    ``activation`` is ``"relu"`` or ``"tanh"`` (smooth: every Taylor term exists everywhere,
    which is what a second-order prediction assumes; ReLU's kinks are invisible to its Hessian).
    """
    if activation not in CNN_ACTIVATIONS:
        raise ValueError(
            f"digits_cnn: activation must be one of {sorted(CNN_ACTIVATIONS)}, got {activation!r}."
        )
    make = CNN_ACTIVATIONS[activation]
    torch.manual_seed(seed)
    return (
        nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            make(),
            nn.Conv2d(channels, channels, 3, padding=1),
            make(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(channels * 16, num_classes),
        )
        .to(dtype)
        .eval()
    )
