"""Tokenizers, the default corpus, and step-indexed batches."""
