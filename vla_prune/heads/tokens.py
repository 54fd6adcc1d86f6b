"""OpenVLA's head: greedy decoding of action tokens (argmax over the whole vocabulary)."""

from __future__ import annotations

from ..models.openvla import ActionTokenizer
from .base import ActionHead, HeadOutput, Unnormalize


class TokenDecodingHead(ActionHead):
    stage = "decode"
    prefill_output = "logits"

    def __init__(self, action_tokenizer: ActionTokenizer, action_dim: int):
        self.action_tokenizer = action_tokenizer
        self.action_dim = action_dim

    @property
    def max_new_tokens(self) -> int:
        return self.action_dim

    @property
    def decode_steps(self) -> int:
        return self.action_dim - 1  # the first token comes from the prefill's logits

    def run(self, pre, engine, probe_layer: int | None, unnormalize: Unnormalize) -> HeadOutput:
        """Decode action_dim tokens. With `probe_layer`, the action-level score: each decode
        query's attention to the visual tokens at that layer, averaged over heads and steps."""
        out = engine.greedy_decode(pre.output.argmax(-1), self.action_dim - 1, probe_layer)
        token_ids = out.tokens.cpu().numpy()
        normalized = self.action_tokenizer.decode(token_ids)[:, None]  # [B, 1, action_dim]
        scores = None if out.probe is None else out.probe.mean(dim=1)  # heads -> [B, N]
        return HeadOutput(
            unnormalize(normalized), normalized, token_ids, scores, probe_ms=out.probe_ms
        )
