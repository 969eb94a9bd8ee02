"""A tiny causal language model and its word-level tokenizer, built locally (nothing from the Hub), for TRL tests."""

from __future__ import annotations

import random

from tests.helpers.tiny_glue import VOCAB_WORDS

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]


def tiny_tokenizer():
    """A word-level fast tokenizer over `VOCAB_WORDS` (whitespace split), with pad, unk, bos and eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(SPECIAL + VOCAB_WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def tiny_llama(vocab_size: int):
    """A one-layer Llama of a few thousand parameters, initialised from its config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return LlamaForCausalLM(config)


def sentences(n: int, seed: int = 0) -> list[str]:
    """`n` short sentences over the tokenizer's words."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(VOCAB_WORDS) for _ in range(rng.randint(4, 9))) for _ in range(n)]
