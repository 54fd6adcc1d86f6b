"""Training-only objective: heads of the action query attend to the target, goal and gripper.

The chain measured in checkpoints-training §6: the vision tokens carry their grid position,
the grounding head finds the target's token from the final hidden states, yet the action
query's estimate of the target position stays 5-6 cm off. Knowing *which* token is the target
is not the same as having read its value. Here a few heads of one middle decoder layer are
told where to look: at the query row (the last prompt token, which predicts the first action
token), head r's softmax attention should put its mass on the patches the segmentation render
labels as role r (`sim.grounding.MASK_ROLES`: target, goal, gripper), so those tokens'
values — which carry where they are — flow into the query. The other heads stay free.

Computed from the layer's own input (captured by a forward pre-hook) with the layer's own
norm, projections and rotary tables, i.e. exactly the scores its SDPA uses; no eager
attention, no change to the model. Nothing is exported: the policy stays plain OpenVLA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from vla_prune.engine.rope import apply_rope


@contextlib.contextmanager
def capture_layer_input(layer: torch.nn.Module) -> Iterator[dict]:
    """While active, each forward of `layer` stores its hidden-state input and rotary
    (cos, sin) in the yielded dict (the last call wins)."""
    seen: dict = {}

    def hook(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        seen["rope"] = kwargs["position_embeddings"]

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def query_attention(
    layer: torch.nn.Module, seen: dict, lengths: Sequence[int], num_heads: int
) -> torch.Tensor:
    """[B, H, L] softmax attention of each sequence's last valid row (right padding) over
    all rows, as `layer` computes it."""
    h = seen["hidden"]
    b, n, _ = h.shape
    cos, sin = (t.expand(b, -1, -1) for t in seen["rope"])  # [1 or B, L, hd]
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    last = torch.tensor(lengths) - 1
    rows = torch.arange(b)
    q = attn.q_proj(x[rows, last]).view(b, num_heads, 1, -1)
    k = attn.k_proj(x).view(b, n, -1, q.shape[-1]).transpose(1, 2)
    q = apply_rope(q, cos[rows, last][:, None], sin[rows, last][:, None])
    k = apply_rope(k, cos, sin)
    if k.shape[1] != num_heads:  # grouped-query attention
        k = k.repeat_interleave(num_heads // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2))[:, :, 0].float() * q.shape[-1] ** -0.5
    pad = torch.arange(n)[None] >= torch.tensor(lengths)[:, None]  # the query sees every valid row
    return torch.softmax(scores.masked_fill(pad[:, None], float("-inf")), dim=-1)


def attention_mass_loss(
    attn: torch.Tensor, masks: torch.Tensor, first_visual: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """-log of the attention mass head r puts on role r's patches, averaged over scenes and
    roles; and that mass [R] (the quantity to watch: 1 = looks only there)."""
    n_roles, n_patches = masks.shape[1], masks.shape[2]
    visual = attn[:, :n_roles, first_visual : first_visual + n_patches]
    mass = (visual * masks.to(visual.dtype)).sum(-1)  # [B, R]
    return -torch.log(mass.clamp(min=1e-6)).mean(), mass.mean(0).detach()


def readout_loss(head: torch.nn.Module, query: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 of the roles' world (x, y) [B, R, 2] (scaled like sim.dataset's aux targets)
    read linearly off the query's hidden state [B, D] right after the supervised layer.

    Attending to the right token is not reading it: the probe (`sim.probe --readout`) found the
    target's token holding its position to ~3 cm while the query after the supervised layer held
    ~14 cm. This loss makes the attended values carry the position into the query."""
    pred = head(query).float().view(*xy.shape)
    return F.smooth_l1_loss(pred, xy.float(), beta=0.1)
