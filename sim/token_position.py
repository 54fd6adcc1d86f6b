"""Training-only objective: every visual token says where on the patch grid it sits.

The LLM reads the visual tokens as a flat sequence with 1-D RoPE, so "which token is the
target" (the grounding objective, solved) does not become "where is the target" unless the
token itself carries its position. The pretrained vision tower's tokens do (a linear probe
reads their row/column to 0.25-0.45 patches); after behaviour cloning, the projector's output,
which is what the LLM sees, has lost most of it (0.8-1.1 patches; `sim.probe --positions`).
A linear head on each projected token regressing its (row, col) keeps that information
linearly readable.

Which patch is not enough for a 2 cm grasp box (a patch is ~8 cm of table): the tower's tokens
also say where inside their patch the thing they show sits (`sim.probe --offsets`: 0.17 / 0.12
patches from the tower; after BC 0.28 / 0.21 from the projector, against 0.45 / 0.41 for no
information; checkpoints-training §7). A second head regresses that offset, on the
labelled grounding scenes (`sim.grounding`), for the patches the segmentation render says show
a thing. Both heads are dropped at export: the policy stays plain OpenVLA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TokenPositionHead(torch.nn.Module):
    """Projected visual token [.., llm_dim] -> 2 numbers: its (row, col) scaled to [-1, 1]
    (`token_position_loss`), or its thing's sub-patch offset (`token_offset_loss`)."""

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


def token_offset_loss(
    head: TokenPositionHead, tokens: torch.Tensor, offsets: torch.Tensor, has_thing: torch.Tensor
) -> torch.Tensor:
    """Smooth-L1 of the sub-patch (col, row) offset [B, P, 2] (in patches, from
    `sim.seglabels.patch_labels`) of the thing each projected token shows, over the tokens
    that show one (`has_thing` [B, P])."""
    pred = head(tokens).float()[has_thing]
    return F.smooth_l1_loss(pred, offsets[has_thing], beta=0.1) if len(pred) else pred.sum()
