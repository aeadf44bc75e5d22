"""Shared fixtures: a pre-trained tiny tokenizer, a shared data cache, the tiny recipe."""
from __future__ import annotations

from pathlib import Path

import pytest

from antlm_testutil import tiny_args_for


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A 512-token BPE trained once on the bundled corpus, saved as tokenizer.json."""
    from antlm_dist.data.corpus import find_corpus
    from antlm_dist.data.tokenizer import save_tokenizer, train_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    corpus = find_corpus("bundled")
    return save_tokenizer(train_tokenizer(corpus.train[:2], 512, 2), folder)


@pytest.fixture(scope="session")
def wordpiece(tmp_path_factory) -> Path:
    """A 512-token WordPiece tokenizer (LTG-BERT's kind) trained once on the bundled corpus."""
    from antlm_dist.data.corpus import find_corpus
    from antlm_dist.data.tokenizer import save_tokenizer, train_tokenizer

    return save_tokenizer(train_tokenizer(find_corpus("bundled").train[:2], 512, 2, "wordpiece"),
                          tmp_path_factory.mktemp("wordpiece"))


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture
def tiny_args(tiny_tokenizer, data_cache) -> list[str]:
    return tiny_args_for(tiny_tokenizer, data_cache)
