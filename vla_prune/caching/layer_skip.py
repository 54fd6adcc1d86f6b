"""LLM layer skipping chosen by block influence (EfficientVLA).

Record the hidden states entering and leaving every decoder layer over a set of control steps,
score each layer by its block influence I(l) = 1 - mean cos(x_l, x_{l+1}) (a layer that barely
turns the residual stream does little), and skip the least influential ones. The recording is
saved, so the skip list is a deterministic function of it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class InfluenceRecording:
    """Per layer: the summed cosine similarity between its input and output, and the count."""

    policy: str
    cos_sum: list[float]
    count: int

    @property
    def influence(self) -> np.ndarray:
        """I(l) = 1 - mean_tokens,steps cos(x_l, x_{l+1})."""
        return 1.0 - np.asarray(self.cos_sum, dtype=np.float64) / max(self.count, 1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @staticmethod
    def load(path: str | Path) -> InfluenceRecording:
        try:
            return InfluenceRecording(**json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"cannot read the influence recording {path}: {e}") from e


@torch.inference_mode()
def record_influence(policy, steps: Iterable[tuple[np.ndarray, str]]) -> InfluenceRecording:
    """Run dense prefills over (image, instruction) steps and accumulate cos(x_l, x_{l+1})."""
    engine = policy.engine
    n_layers = len(engine.layers)
    cos_sum = np.zeros(n_layers)
    count = 0
    saved_skip, engine.skip_layers = engine.skip_layers, frozenset()
    try:
        for image, instruction in steps:
            inputs = policy.prepare(image, instruction)
            embeds = policy.model.embed_inputs(inputs["pixel_values"], inputs["input_ids"])
            pad = torch.zeros(1, dtype=torch.long, device=embeds.device)
            pre = engine.prefill(embeds, pad, 0, record_layers=range(n_layers), output="hidden")
            hidden = pre.context.hidden_in
            outs = [hidden[i + 1] for i in range(n_layers - 1)] + [pre.last_hidden]
            for i in range(n_layers):
                cos = torch.nn.functional.cosine_similarity(hidden[i], outs[i], dim=-1)
                cos_sum[i] += float(cos.float().mean())
            count += 1
    finally:
        engine.skip_layers = saved_skip
    return InfluenceRecording(policy.config.name, cos_sum.tolist(), count)


def choose_skips(
    recording: InfluenceRecording, n_skip: int, protect: Iterable[int] = ()
) -> list[int]:
    """The n_skip layers of lowest influence, never the first or last layer nor `protect`
    (layers whose attention a pruning method reads). Ties -> lower index."""
    influence = recording.influence
    n = len(influence)
    keep = {0, n - 1, *protect}
    candidates = [i for i in np.argsort(influence, kind="stable") if i not in keep]
    if n_skip > len(candidates):
        raise ValueError(f"can skip at most {len(candidates)} of {n} layers (protected: {keep})")
    return sorted(int(i) for i in candidates[:n_skip])


def load_skip_list(path: str | Path) -> list[int]:
    """The `skip_layers` of a file written by `vla-prune calibrate`."""
    try:
        skips = json.loads(Path(path).read_text())["skip_layers"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read a skip list from {path}: {e!r}") from e
    if not isinstance(skips, list) or not all(isinstance(i, int) for i in skips):
        raise ValueError(f"{path}: skip_layers must be a list of layer indices, got {skips!r}")
    return skips
