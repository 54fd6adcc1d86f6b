import numpy as np
import pytest
import torch

import vla_prune

INSTRUCTIONS = [
    "pick up the red block",
    "push the blue cube onto the green pad",
    "press the yellow button",
    "put the small green cylinder in the bowl",
]


def scramble(policy: vla_prune.Policy, seed: int, std: float = 0.15) -> vla_prune.Policy:
    """Large random weights: a freshly initialized tiny LLM emits the same token for every
    input, which would make token-equality tests pass trivially. This makes tokens vary."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (policy.model.language_model, policy.model.projector):
            for w in module.parameters():
                if w.ndim == 2:
                    w.copy_(torch.randn(w.shape, generator=g) * std)
    return policy


def tiny_policy(seed: int = 0) -> vla_prune.Policy:
    return scramble(vla_prune.build_policy("tiny-openvla", seed=seed), seed)


def tiny_cogact(seed: int = 0):
    """tiny-cogact with large random weights everywhere (CogACT zero-inits the DiT's last layer,
    which would make every chunk independent of the input)."""
    policy = scramble(vla_prune.build_policy("tiny-cogact", seed=seed), seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for w in policy.model.action_model.parameters():
            w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    return policy


def random_image(seed: int, size: int = 224) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def policy() -> vla_prune.Policy:
    return tiny_policy(0)
