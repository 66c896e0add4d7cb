"""Models by name: the training loop asks for one and never cares which it gets.

Builders import torch lazily so the supervisor (which must not import torch) can
validate a model name from this registry.
"""

from __future__ import annotations

from typing import Any, Callable


def cifarnet() -> Any:
    """The original study's CIFAR-10 CNN: two 5x5 convs with max-pool, three linear layers."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2, 2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, 10),
    )


MODELS: dict[str, Callable[[], Any]] = {"cifarnet": cifarnet}


def build_model(name: str) -> Any:
    return MODELS[name]()
