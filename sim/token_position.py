"""Training-only objective: every visual token says where on the patch grid it sits.

The LLM reads the visual tokens as a flat sequence with 1-D RoPE, so "which token is the
target" (the grounding objective, solved) does not become "where is the target" unless the
token itself carries its position. The pretrained vision tower's tokens do (a linear probe
reads their row/column to 0.25-0.45 patches); after behaviour cloning, the projector's output,
which is what the LLM sees, has lost most of it (0.8-1.1 patches; `sim.probe --positions`).
A linear head on each projected token regressing its (row, col) keeps that information
linearly readable. The head is dropped at export: the policy stays plain OpenVLA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TokenPositionHead(torch.nn.Module):
    """Projected visual token [.., llm_dim] -> its (row, col), scaled to [-1, 1]."""

    def __init__(self, llm_dim: int):
        super().__init__()
        self.linear = torch.nn.Linear(llm_dim, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(tokens)


def patch_grid(num_patches: int) -> torch.Tensor:
    """[num_patches, 2] (row, col) of each token in raster order, in patches."""
    side = int(round(num_patches**0.5))
    if side * side != num_patches:
        raise ValueError(f"token positions need a square patch grid, got {num_patches} tokens")
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([rows, cols], dim=-1).reshape(num_patches, 2).float()


def grid_targets(num_patches: int) -> torch.Tensor:
    """`patch_grid` scaled to [-1, 1]."""
    side = int(round(num_patches**0.5))
    return patch_grid(num_patches) / (side - 1) * 2 - 1


def token_position_loss(head: TokenPositionHead, tokens: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 of every projected visual token's [B, P, D] predicted grid position."""
    target = grid_targets(tokens.shape[1]).expand(tokens.shape[0], -1, -1)
    return F.smooth_l1_loss(head(tokens).float(), target, beta=0.1)
