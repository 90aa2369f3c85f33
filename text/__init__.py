"""Text: CLIP's BPE tokenizer (``text.tokenize``) and every prompt template (``text.prompts``).

A package of its own below ``datasets`` and ``model``, which both tokenize prompt texts.
"""
from text.tokenizer import TokenizerLengthError, tokenize

__all__ = ["TokenizerLengthError", "tokenize"]
