"""CogACT: OpenVLA's vision backbone + projector + Llama, a cognition token, and a DiT head.

The LLM runs one prefill over [BOS, visual tokens, prompt, cognition token]; the final-norm
hidden state of the cognition token (the last prompt token) conditions a DiT that denoises a
chunk of 16 actions with DDIM (10 steps over a 100-step squaredcos_cap_v2 schedule, eta 0) and
classifier-free guidance by batch doubling.

Cognition token: CogACT appends [29871, 2] to Llama-2 prompts — "▁" (OpenVLA's suffix) and then
EOS (id 2) as the cognition token. Our small word-level tokenizers put EOS ("</s>") at id 2 too,
so `cognition_token_id = 2` everywhere; it is stored in the config.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .arch import VLAConfig
from .dit import DiT, DiTConfig
from .prismatic import OpenVLAModel

# -- the diffusion schedule ---------------------------------------------------------------------


def squaredcos_alphas_cumprod(steps: int = 100, max_beta: float = 0.999) -> torch.Tensor:
    """alpha-bar of the cosine schedule (Nichol & Dhariwal), float64, as CogACT/diffusers."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)
    ]
    return torch.cumprod(1.0 - torch.tensor(betas, dtype=torch.float64), dim=0)


def ddim_timesteps(train_steps: int, ddim_steps: int) -> list[int]:
    """CogACT's "ddim{N}" respacing: the smallest stride s with len(range(0, T, s)) == N,
    newest first. For 10 of 100 this is 90, 80, ..., 0 (diffusers' "leading" spacing agrees)."""
    for stride in range(1, train_steps + 1):
        ts = list(range(0, train_steps, stride))
        if len(ts) == ddim_steps:
            return ts[::-1]
    raise ValueError(f"cannot respace {train_steps} diffusion steps into exactly {ddim_steps}")


@dataclass(frozen=True)
class SamplingConfig:
    """How the DiT head samples, and the optional adaptive action ensemble."""

    cfg_scale: float = 1.5  # classifier-free guidance; 1.0 -> conditional only, no doubling
    ddim_steps: int = 10
    train_steps: int = 100  # the training schedule's length (squaredcos_cap_v2)
    seed: int = 0  # per-slot noise generators are seeded from (seed, slot) at reset()
    ensemble: bool = False  # adaptive action ensemble: StepResult.actions becomes [1, dim]
    ensemble_alpha: float = 0.1
    ensemble_horizon: int = 2  # CogACT: 2 on the Google robot, 7 on WidowX (ENSEMBLE_HORIZON)

    def __post_init__(self):
        if not math.isfinite(self.cfg_scale) or self.cfg_scale < 1.0:
            # CogACT turns guidance on only for scale > 1; below 1 would silently do nothing.
            raise ValueError(f"SamplingConfig.cfg_scale must be >= 1.0, got {self.cfg_scale}")
        if not (1 <= self.ddim_steps <= self.train_steps):
            raise ValueError(
                f"SamplingConfig.ddim_steps must be in [1, {self.train_steps}], "
                f"got {self.ddim_steps}"
            )
        if self.ensemble_horizon < 1:
            raise ValueError(
                f"SamplingConfig.ensemble_horizon must be >= 1, got {self.ensemble_horizon}"
            )
        if not math.isfinite(self.ensemble_alpha):
            raise ValueError(f"SamplingConfig.ensemble_alpha must be finite: {self.ensemble_alpha}")
        ddim_timesteps(self.train_steps, self.ddim_steps)  # validates the respacing


ENSEMBLE_HORIZON = {"google_robot": 2, "widowx": 7}


@dataclass(frozen=True)
class CogACTConfig(VLAConfig):
    """An OpenVLA-shaped backbone plus CogACT's DiT head and cognition token."""

    dit: DiTConfig = DiTConfig()
    cognition_token_id: int = 2  # EOS, appended after the prompt (and after 29871 on Llama-2)
    dit_size: str | None = None  # "DiT-S" / "DiT-B" / "DiT-L" where it is one of those
    sampling: SamplingConfig = SamplingConfig()

    def __post_init__(self):
        if self.dit.token_size != self.llm_dim:
            raise ValueError(f"DiT token_size {self.dit.token_size} != LLM width {self.llm_dim}")
        if self.dit.in_channels != self.action_dim:
            raise ValueError(f"DiT in_channels {self.dit.in_channels} != {self.action_dim}")

    @property
    def chunk(self) -> int:
        return self.dit.chunk

    @staticmethod
    def from_dict(d: dict[str, Any]) -> CogACTConfig:
        d = dict(d)
        dit = DiTConfig(**d.pop("dit"))
        sampling = SamplingConfig(**d.pop("sampling", {}))
        base = VLAConfig.from_dict({k: v for k, v in d.items() if k in _VLA_FIELDS})
        extra = {k: v for k, v in d.items() if k not in _VLA_FIELDS}
        return cogact_config(base, dit=dit, sampling=sampling, **extra)


_VLA_FIELDS = {f.name for f in dataclasses.fields(VLAConfig)}


def cogact_config(base: VLAConfig, dit: DiTConfig | str, **kw) -> CogACTConfig:
    """A CogACT config on an OpenVLA-shaped `base`; `dit` a DiTConfig or a size ("DiT-B")."""
    if isinstance(dit, str):
        kw.setdefault("dit_size", dit)
        dit = DiTConfig.named(dit, token_size=base.llm_dim, in_channels=base.action_dim)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(VLAConfig)}
    fields.update({k: v for k, v in kw.items() if k in _VLA_FIELDS})
    rest = {k: v for k, v in kw.items() if k not in _VLA_FIELDS}
    return CogACTConfig(**fields, dit=dit, **rest)


class ActionModel(nn.Module):
    """CogACT's ActionModel: holds the DiT as `net` (checkpoint keys action_model.net.*)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.net = DiT(cfg)


class CogACTModel(OpenVLAModel):
    """vision_backbone / projector / language_model (as OpenVLA) + action_model.net (the DiT)."""

    def __init__(self, cfg: CogACTConfig):
        super().__init__(cfg)
        self.action_model = ActionModel(cfg.dit)


# -- DDIM over the squaredcos_cap_v2 schedule ---------------------------------------------------


class DDIMSampler:
    """Deterministic DDIM (eta = 0) on epsilon predictions; no clipping in between (as CogACT)."""

    def __init__(self, train_steps: int = 100, ddim_steps: int = 10):
        self.alphas_cumprod = squaredcos_alphas_cumprod(train_steps)
        self.timesteps = ddim_timesteps(train_steps, ddim_steps)

    def step(self, eps: torch.Tensor, t: int, t_prev: int | None, x: torch.Tensor) -> torch.Tensor:
        """x_t -> x_{t_prev} (t_prev None: the final step to x_0, alpha-bar 1)."""
        a = float(self.alphas_cumprod[t])
        a_prev = 1.0 if t_prev is None else float(self.alphas_cumprod[t_prev])
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps

    def sample(
        self, eps_fn: Callable[[torch.Tensor, int, int], torch.Tensor], noise: torch.Tensor
    ) -> torch.Tensor:
        """eps_fn(x, t, step_index) -> predicted noise; returns x_0 (same dtype as noise)."""
        x = noise
        ts = self.timesteps
        for i, t in enumerate(ts):
            eps = eps_fn(x, t, i).to(x.dtype)
            x = self.step(eps, t, ts[i + 1] if i + 1 < len(ts) else None, x)
        return x


def guided_eps(
    net_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    t: int,
    cognition: torch.Tensor,
    uncondition: torch.Tensor,
    cfg_scale: float,
) -> torch.Tensor:
    """Noise prediction with classifier-free guidance by batch doubling (CogACT's
    forward_with_cfg): one forward over [x, x] with conditions [cognition, uncondition], then
    eps = uncond + scale (cond - uncond). Scale 1: one conditional forward, no doubling.

    x [B, T, C] float; cognition [B, 1, D]; uncondition [1, D].
    """
    b = x.shape[0]
    dtype = cognition.dtype
    if cfg_scale == 1.0:
        ts = torch.full((b,), t, device=x.device, dtype=torch.long)
        return net_fn(x.to(dtype), ts, cognition).float()
    ts = torch.full((2 * b,), t, device=x.device, dtype=torch.long)
    z = torch.cat([cognition, uncondition[None].expand(b, 1, -1).to(dtype)])
    out = net_fn(torch.cat([x, x]).to(dtype), ts, z).float()
    cond, uncond = out[:b], out[b:]
    return uncond + cfg_scale * (cond - uncond)
