"""Keep-all must reproduce transformers' own greedy generate bit-for-bit (fp32 round-off)."""

import pytest
import torch

from tests.conftest import INSTRUCTIONS, random_image, tiny_policy

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7, one ulp at 1.0
# Engine vs transformers logits, bounded relative to the largest logit (|z| ~ 10 here): each of the
# 9 fp32 reductions on the way (attention and MLP of 4 layers, lm_head) may be ordered differently
# and move its output by ~4 ulp, 9*4 = 36 eps*max|z|, rounded up to 64 for the scrambled weights'
# gain: atol = 64*eps*max|z| ~ 7.6e-5 (two correct kernels, eager vs SDPA, differ by 19*eps*max|z|;
# an off-by-one decode position by ~1e5 times the bound).
LOGIT_ULPS = 64


def assert_logits_close(got: torch.Tensor, want: torch.Tensor) -> None:
    atol = LOGIT_ULPS * EPS32 * want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0.0, atol=atol)


def reference_generate(policy, image, instruction):
    """transformers' LlamaForCausalLM.generate on the same inputs_embeds, built from the same
    modules but outside our engine."""
    inputs = policy.prepare(image, instruction)
    model = policy.model
    with torch.no_grad():
        embeds = model.embed_inputs(inputs["pixel_values"], inputs["input_ids"])
        out = model.language_model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            max_new_tokens=policy.config.action_dim,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=policy.model.language_model.config.pad_token_id,
        )
    return out.sequences[0].numpy(), torch.stack(out.logits, dim=1)[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keep_all_matches_transformers_generate(seed):
    policy = tiny_policy(seed)
    for j, instruction in enumerate(INSTRUCTIONS[:2]):
        image = random_image(10 * seed + j)
        ref_tokens, ref_logits = reference_generate(policy, image, instruction)
        # our logits: replay the engine and keep them
        result = policy.step(image, instruction)
        assert (result.action_tokens == ref_tokens).all()
        logits = _engine_logits(policy, image, instruction)
        assert_logits_close(logits, ref_logits)


def test_tokens_actually_vary():
    """Guard against a vacuous test: the scrambled models must not emit constant tokens."""
    policy = tiny_policy(0)
    tokens = {tuple(policy.step(random_image(s), INSTRUCTIONS[s]).action_tokens) for s in range(4)}
    assert len(tokens) == 4


def _engine_logits(policy, image, instruction):
    inputs = policy.prepare(image, instruction)
    with torch.no_grad():
        embeds = policy.model.embed_inputs(inputs["pixel_values"], inputs["input_ids"])
    engine = policy.engine
    logits = engine.prefill(embeds, torch.zeros(1, dtype=torch.long), 7).output
    out = [logits]
    for _ in range(6):
        logits = engine.decode(out[-1].argmax(-1)).logits
        out.append(logits)
    return torch.stack(out, dim=1)[0]
