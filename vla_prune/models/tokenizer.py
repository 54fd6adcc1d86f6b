"""Word-level tokenizers for small models, laid out like OpenVLA's vocabulary.

Ids: 0 <unk>, 1 <s>, 2 </s>, then words, then filler, and the last 256 ids are action tokens —
so the same id <-> bin arithmetic works for our tokenizers and Llama's 32000-token one. They are
saved as tokenizer.json and load with `transformers.AutoTokenizer`, the same call that loads a
real checkpoint's SentencePiece tokenizer.
"""

from __future__ import annotations

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<unk>", "<s>", "</s>"]

# Prompt words plus a vocabulary of tabletop manipulation instructions.
BASE_WORDS = """
in : what action should the robot take to ? out
a an the of on onto into in to from with and then it its at by up down over under near next left
right front back behind top bottom middle center side far close corner edge between
pick place put push pull press touch open close lift move slide stack turn grab grasp drop
set lower raise tap hit reach rotate flip knock
red green blue yellow purple orange white black gray grey pink cyan brown magenta
cube block box cylinder sphere ball button pad plate bowl zone target tray cup mug bottle
drawer door lid object objects item square circle disk goal area mat region marker can
small large big tiny short tall first second third other one two three
""".split()


def build_word_tokenizer(
    vocab_size: int, n_action_bins: int = 256, words: list[str] | None = None
) -> PreTrainedTokenizerFast:
    words = list(dict.fromkeys(BASE_WORDS + (words or [])))
    n_fill = vocab_size - n_action_bins - len(SPECIAL) - len(words)
    if n_fill < 0:
        raise ValueError(
            f"vocab_size {vocab_size} too small for {len(words)} words + {n_action_bins} actions"
        )
    tokens = SPECIAL + words + [f"<fill_{i}>" for i in range(n_fill)]
    tokens += [f"<act_{i}>" for i in range(n_action_bins)]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
