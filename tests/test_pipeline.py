"""The data path: the int32 block cache is memory-mapped read-only and cast per batch, and
the prefetch thread yields exactly the batches the training thread would collate."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from antlm_dist.data.blocks import PackedBlocks, load_blocks
from antlm_dist.data.collators import CLMCollator, MLMCollator
from antlm_dist.data.pipeline import BatchPrefetcher
from antlm_dist.data.sampler import DistributedResumableSampler
from antlm_dist.schedule import parse_schedule, phase_for_step


def test_block_cache_is_an_int32_read_only_memory_map(tmp_path, tiny_tokenizer):
    from antlm_dist.data.corpus import find_corpus
    from antlm_dist.data.dataset import blocks_array, build_packed_dataset
    from antlm_dist.data.tokenizer import load_tokenizer, tokenizer_hash

    tok = load_tokenizer(tiny_tokenizer)
    files = find_corpus("bundled").dev[:1]
    blocks = load_blocks(files, tok, tokenizer_hash(tiny_tokenizer), 32, tmp_path, 1, True, "dev")
    assert isinstance(blocks.array, np.memmap) and blocks.array.dtype == np.int32
    assert not blocks.array.flags.writeable
    expected = blocks_array(build_packed_dataset(files, tok, 32, tmp_path / "ref"))  # built again, independently
    assert blocks.shape == expected.shape and len(blocks) == expected.shape[0] > 4
    batch = blocks[[3, 0, 3]]
    assert batch.dtype == torch.int64 and torch.equal(batch, torch.from_numpy(expected[[3, 0, 3]]).long())
    head = blocks[:2]
    assert isinstance(head, PackedBlocks) and head.shape == (2, 32) and np.shares_memory(head.array, blocks.array)
    again = load_blocks(files, tok, tokenizer_hash(tiny_tokenizer), 32, tmp_path, 1, False, "dev")  # cache hit
    assert np.array_equal(again.array, blocks.array)


def _setup(n_blocks=40):
    gen = torch.Generator().manual_seed(0)
    blocks = PackedBlocks(torch.randint(5, 50, (n_blocks, 16), generator=gen).to(torch.int32).numpy())
    sampler = DistributedResumableSampler(n_blocks, 2, 2, 2, 1, seed=3)
    collators = {"CLM": CLMCollator(eos_id=2, pad_id=0),
                 "MLM": MLMCollator(mask_id=4, pad_id=0, eos_id=2, special_ids=[0, 1, 2, 3, 4], vocab_size=50,
                                    seed=3, mlm_probability=0.3)}
    return blocks, sampler, collators, parse_schedule("1_CLM+2_MLM")


def test_prefetched_batches_equal_batches_collated_in_place():
    blocks, sampler, collators, phases = _setup()
    spe = sampler.steps_per_epoch
    got = list(BatchPrefetcher(blocks, sampler, collators, phases, spe, 1, 3 * spe))
    assert [s for s, _, _ in got] == list(range(1, 3 * spe))
    for step, phase, micro in got:
        assert phase == phase_for_step(step, phases, spe)
        ids_list = sampler.micro_batches(step)
        assert len(micro) == len(ids_list) == 2
        for batch, ids in zip(micro, ids_list):
            ref = collators[phase.objective](blocks[ids], ids, phase.epoch)
            assert torch.equal(batch.input_ids, ref.input_ids) and torch.equal(batch.labels, ref.labels)
            assert torch.equal(batch.attention_mask, ref.attention_mask)
    assert any(p.objective == "MLM" for _, p, _ in got) and any(p.objective == "CLM" for _, p, _ in got)


def test_prefetcher_raises_the_threads_error_and_closes_early():
    blocks, sampler, collators, phases = _setup()

    def broken(*_):
        raise RuntimeError("collator broke")

    with pytest.raises(RuntimeError, match="collator broke"):
        list(BatchPrefetcher(blocks, sampler, {"CLM": broken, "MLM": broken}, phases, 5, 0, 3))
    stream = BatchPrefetcher(blocks, sampler, collators, phases, sampler.steps_per_epoch, 0, 30, depth=1)
    first = next(iter(stream))
    stream.close()
    assert first[0] == 0 and not stream._thread.is_alive()
