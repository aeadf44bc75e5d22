"""Corpus loading, tokenizer, packed datasets, the resumable sampler and the phase collators."""
