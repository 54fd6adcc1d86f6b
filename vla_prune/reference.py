"""The reference pipeline: an OpenVLA step the way upstream runs it.

transformers' `generate()` with eager attention and its dynamic cache, greedy, on the same
modules and weights as our engine; with `output_attentions=True` as upstream pruning repos run
(VLA-Pruner's hook forces it on every layer). Every speedup we report is a ratio against this,
measured in the same process.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from .engine.runner import PrefillResult
from .policy import Policy, StepResult
from .runtime.timing import StageTimer


@contextmanager
def attention_implementation(lm, name: str):
    """Temporarily switch a transformers model's attention kernel (looked up per forward)."""
    old = lm.config._attn_implementation
    lm.config._attn_implementation = name
    try:
        yield
    finally:
        lm.config._attn_implementation = old


class ReferencePipeline:
    def __init__(self, policy: Policy, attn: str = "eager", output_attentions: bool = False):
        self.policy, self.attn, self.output_attentions = policy, attn, output_attentions

    @torch.inference_mode()
    def step(self, image: np.ndarray, instruction: str) -> StepResult:
        p = self.policy
        lm = p.model.language_model
        timer = StageTimer(p.device)
        with timer.stage("preprocess"):
            inputs = p.prepare(image, instruction)
        with timer.stage("vision"):
            features = p.model.vision_backbone(inputs["pixel_values"])
        with timer.stage("projector"):
            patches = p.model.projector(features)
            text = lm.get_input_embeddings()(inputs["input_ids"])
            embeds = torch.cat([text[:, :1], patches, text[:, 1:]], dim=1)
        if p.head.prefill_output == "hidden":  # a head on the hidden state: one forward, then it
            return self._cogact_step(p, lm, embeds, timer)
        with timer.stage("generate"), attention_implementation(lm, self.attn):
            out = lm.generate(
                inputs_embeds=embeds,
                attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=p.device),
                max_new_tokens=p.config.action_dim,
                do_sample=False,
                output_attentions=self.output_attentions,
                return_dict_in_generate=True,
                pad_token_id=lm.config.pad_token_id,
            )
        with timer.stage("post"):
            tokens = out.sequences[0, -p.config.action_dim :].cpu().numpy()
            normalized = p.action_tokenizer.decode(tokens)[None]
            actions = p.unnormalize(normalized[None])[0]
        return StepResult(actions, tokens, timer.finish(), p.config.num_patches, normalized)

    def _cogact_step(self, p, lm, embeds, timer) -> StepResult:
        """CogACT upstream: generate(max_new_tokens=1, output_hidden_states=True), the final
        hidden state of the cognition token, then the DiT head without feature caching."""
        with timer.stage("generate"), attention_implementation(lm, self.attn):
            out = lm.generate(
                inputs_embeds=embeds,
                attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=p.device),
                max_new_tokens=1,
                do_sample=False,
                output_hidden_states=True,
                output_attentions=self.output_attentions,
                return_dict_in_generate=True,
                pad_token_id=lm.config.pad_token_id,
            )
            cognition = out.hidden_states[0][-1][:, -1]  # after the final norm
        p._slots(1)
        cache = p.head.cache_config
        with timer.stage("action_head"):
            p.head.cache_config = type(cache)(interval=cache.interval, enabled=False)
            try:
                pre = PrefillResult(cognition, None, None, None)  # the head reads .output only
                head = p.head.run(pre, p.engine, None, p.unnormalize)
            finally:
                p.head.cache_config = cache
        return StepResult(
            head.actions[0], None, timer.finish(), p.config.num_patches, head.normalized[0]
        )
