"""Corpus layouts, packing and the resumable sampler, against straightforward references."""
import pytest
import torch

from antlm_dist.data.corpus import CorpusError, find_corpus
from antlm_dist.data.dataset import blocks_array, build_packed_dataset
from antlm_dist.data.sampler import DistributedResumableSampler
from antlm_dist.data.tokenizer import load_tokenizer, tokenizer_hash


def test_babylm_2024_layout_and_file_lists(tmp_path):
    (tmp_path / "babylm_10M").mkdir()
    (tmp_path / "babylm_dev").mkdir()
    (tmp_path / "babylm_10M" / "b.train").write_text("one\ntwo\n")
    (tmp_path / "babylm_10M" / "a.train").write_text("three\n")
    (tmp_path / "babylm_dev" / "a.dev").write_text("four\n")
    c = find_corpus(str(tmp_path))
    assert [p.name for p in c.train] == ["a.train", "b.train"] and [p.name for p in c.dev] == ["a.dev"]
    c2 = find_corpus([str(tmp_path / "babylm_10M" / "a.train"), str(tmp_path / "babylm_dev" / "a.dev")])
    assert [p.name for p in c2.train] == ["a.train"] and [p.name for p in c2.dev] == ["a.dev"]
    with pytest.raises(CorpusError, match="data.corpus is an empty list"):
        find_corpus([])
    bundled = find_corpus("bundled")
    assert len(bundled.train) == 5 and len(bundled.dev) == 5


def test_packing_equals_concatenated_lines(tmp_path, tiny_tokenizer):
    tok = load_tokenizer(tiny_tokenizer)
    lines = ["The cat sat on the mat.", "", "And the dog barked at the moon!", "x" * 50, "In the beginning."] * 7
    f = tmp_path / "t.train"
    f.write_text("\n".join(lines) + "\n")
    ds = build_packed_dataset([f], tok, seq_len=16, cache_dir=tmp_path / "cache", num_proc=1)
    stream = []
    for line in lines:
        if line.strip():
            stream += tok(line, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(stream) // 16
    ref = torch.tensor(stream[: n * 16]).view(n, 16)
    got = torch.from_numpy(blocks_array(ds)).long()
    assert torch.equal(got, ref)
    assert len(tokenizer_hash(tiny_tokenizer)) == 64


def test_sampler_is_world_size_invariant_and_resumable():
    n = 103
    one = DistributedResumableSampler(n, micro_batch_size=2, gradient_accumulation_steps=4, world_size=1, rank=0, seed=9)
    two = [DistributedResumableSampler(n, 2, 2, 2, r, seed=9) for r in range(2)]
    assert one.global_batch == two[0].global_batch == 8 and one.steps_per_epoch == 12
    for step in (0, 5, 12, 30):
        a = sorted(i for mb in one.micro_batches(step) for i in mb)
        b = sorted(i for s in two for mb in s.micro_batches(step) for i in mb)
        assert a == b and len(a) == 8
    # each epoch visits distinct blocks, and epochs are shuffled differently
    epoch0 = [i for s in range(12) for mb in one.micro_batches(s) for i in mb]
    epoch1 = [i for s in range(12, 24) for mb in one.micro_batches(s) for i in mb]
    assert len(set(epoch0)) == 96 and epoch0 != epoch1
    # the state converts between world sizes
    state = two[1].state_dict(17)
    assert state["epoch"] == 1 and state["position"] == 5 * 8
    assert one.step_from_state(state) == 17
    with pytest.raises(ValueError, match="global batch"):
        DistributedResumableSampler(n, 3, 1, 1, 0, seed=9).step_from_state(state)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        DistributedResumableSampler(5, 4, 1, 2, 0, seed=9)
