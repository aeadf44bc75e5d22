import torch

from antlm_dist.data.collators import IGNORE_INDEX, CLMCollator, MLMCollator, segment_ids_from_eos

V, PAD, BOS, EOS, UNK, MASK = 1000, 0, 1, 2, 3, 4
SPECIAL = [PAD, BOS, EOS, UNK, MASK]


def _blocks(n, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(5, V, (n, t), generator=g)
    x[:, ::17] = EOS  # some special tokens inside the blocks
    return x


def _mlm(**kw):
    args = dict(mask_id=MASK, pad_id=PAD, eos_id=EOS, special_ids=SPECIAL, vocab_size=V, seed=7)
    args.update(kw)
    return MLMCollator(**args)


def test_clm_labels_are_next_tokens():
    x = _blocks(3, 20)
    b = CLMCollator(eos_id=EOS, pad_id=PAD)(x)
    for i in range(3):
        for t in range(19):
            assert b.labels[i, t] == x[i, t + 1]
        assert b.labels[i, 19] == IGNORE_INDEX
    assert torch.equal(b.input_ids, x) and bool(b.attention_mask.all())


def test_mlm_selection_rates_on_a_large_sample():
    x = _blocks(400, 128)
    b = _mlm()(x, list(range(400)), epoch=0)
    eligible = ~torch.isin(x, torch.tensor(SPECIAL))
    selected = b.labels != IGNORE_INDEX
    rate = selected.sum().item() / eligible.sum().item()
    assert abs(rate - 0.15) < 0.005, rate
    assert torch.equal(b.labels[selected], x[selected])
    masked = selected & (b.input_ids == MASK)
    kept = selected & (b.input_ids == x)
    replaced = selected & ~masked & ~kept
    n = selected.sum().item()
    assert abs(masked.sum().item() / n - 0.8) < 0.015
    # a random replacement can equal the original (p = 1/995), so "kept" is ~10% + tiny
    assert abs(kept.sum().item() / n - 0.1) < 0.01
    assert abs(replaced.sum().item() / n - 0.1) < 0.01
    assert not torch.isin(b.input_ids[replaced], torch.tensor(SPECIAL)).any()
    # no special token is ever selected, and unselected positions are untouched
    assert not (selected & ~eligible).any()
    assert torch.equal(b.input_ids[~selected], x[~selected])


def test_mlm_masks_reproducible_per_seed_epoch_sample():
    x = _blocks(8, 64)
    c = _mlm()
    a = c(x, list(range(8)), epoch=3)
    b = c(x, list(range(8)), epoch=3)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    # the same sample gives the same mask whatever batch it lands in (any world size)
    single = c(x[5:6], [5], epoch=3)
    assert torch.equal(single.labels[0], a.labels[5])
    # new masks each epoch, and per seed
    assert not torch.equal(c(x, list(range(8)), epoch=4).labels, a.labels)
    assert not torch.equal(_mlm(seed=8)(x, list(range(8)), epoch=3).labels, a.labels)


def test_mlm_next_position_targets():
    x = _blocks(16, 64)
    same = _mlm()(x, list(range(16)), epoch=1)
    nxt = _mlm(mlm_target="next_position")(x, list(range(16)), epoch=1)
    assert torch.equal(same.input_ids, nxt.input_ids)
    sel = same.labels != IGNORE_INDEX
    assert torch.equal(nxt.labels[:, :-1], torch.where(sel[:, 1:], x[:, 1:], IGNORE_INDEX))
    assert (nxt.labels[:, -1] == IGNORE_INDEX).all()


def test_segment_ids_split_after_eos():
    x = torch.tensor([[5, 6, EOS, 7, EOS, 8, 9]])
    assert segment_ids_from_eos(x, EOS).tolist() == [[0, 0, 0, 1, 1, 2, 2]]
