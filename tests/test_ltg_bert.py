"""LTG-BERT backbone, span masking, the WordPiece option, HF export, and 2-rank training.

The layer test re-derives LTG-BERT's equations (Samuel et al. 2023; DeBERTa's disentangled
attention, He et al. 2021) in float64 with its own bucketing, independent of the model code.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from antlm_dist.config import ConfigError, ModelConfig, load_recipe
from antlm_dist.data.sampler import derive_seed
from antlm_dist.data.span_masking import MAX_SPAN_LENGTH, SpanMLMCollator, capped_geometric_pmf
from antlm_dist.metrics import read_metrics
from antlm_dist.model import build_model
from antlm_dist.model.attention import build_attention_mask
from antlm_dist.model.ltg_bert import LtgBertLayer, log_bucket_position, relative_position_index
from antlm_testutil import TINY, assert_ok, run_cli

# ----------------------------------------------------------------------------- the equations, independently


def ref_bucket(d: int, bucket_size: int, max_position: int) -> int:
    """Log-bucketed signed distance, written from the definition with Python floats."""
    mid = bucket_size // 2
    if abs(d) <= mid:
        return d
    a = min(abs(d), max_position - 1)
    b = mid + math.ceil(math.log(a / mid) / math.log((max_position - 1) / mid) * (mid - 1))
    return b if d > 0 else -b


@pytest.mark.parametrize("bucket_size,max_position", [(32, 512), (8, 24)])
def test_log_buckets_match_the_definition(bucket_size, max_position):
    d = torch.arange(-1100, 1101)
    got = log_bucket_position(d, bucket_size, max_position).tolist()
    assert got == [ref_bucket(int(x), bucket_size, max_position) for x in d]
    assert max(got) == bucket_size - 1 and min(got) == -(bucket_size - 1)
    assert all(a <= b for a, b in zip(got, got[1:]))  # monotone in the distance
    idx = relative_position_index(40, bucket_size, max_position)
    assert idx[5, 3] == ref_bucket(2, bucket_size, max_position) + bucket_size - 1  # r(i, j) uses i - j
    assert idx.min() >= 0 and idx.max() <= 2 * bucket_size - 2


def _ln(x, eps, w=None, b=None):
    mu = x.mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w + b


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def ref_layer(x, rel, p, cfg: ModelConfig, allowed):
    """One LTG-BERT layer from the equations. x (B, T, H); rel (R, H); allowed (B, T, T) bool."""
    B, T, H = x.shape
    N, S, eps = cfg.num_attention_heads, cfg.position_bucket_size, cfg.layer_norm_eps
    D, I = H // N, cfg.intermediate_size
    a = "attention."
    h = _ln(x, eps)
    qk = h @ p[a + "in_proj_qk.weight"].T + p[a + "in_proj_qk.bias"]
    q, k = qk[..., :H].reshape(B, T, N, D), qk[..., H:].reshape(B, T, N, D)
    v = (h @ p[a + "in_proj_v.weight"].T + p[a + "in_proj_v.bias"]).reshape(B, T, N, D)
    pos = rel @ p[a + "in_proj_qk.weight"].T + p[a + "in_proj_qk.bias"]
    qp, kp = pos[:, :H].reshape(-1, N, D), pos[:, H:].reshape(-1, N, D)
    r = torch.tensor([[ref_bucket(i - j, S, cfg.max_relative_positions) + S - 1 for j in range(T)] for i in range(T)])
    kp_ij, qp_ij = kp[r], qp[r]  # (T, T, N, D): the embedding of the pair's relative position
    logits = (torch.einsum("bind,bjnd->bnij", q, k) + torch.einsum("bind,ijnd->bnij", q, kp_ij)
              + torch.einsum("bjnd,ijnd->bnij", k, qp_ij)) / math.sqrt(3 * D)
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    ctx = torch.einsum("bnij,bjnd->bind", logits.softmax(-1), v).reshape(B, T, H)
    o = ctx @ p[a + "out_proj.weight"].T + p[a + "out_proj.bias"]
    x = x + _ln(o, eps, p[a + "post_layer_norm.weight"], p[a + "post_layer_norm.bias"])
    ug = _ln(x, eps) @ p["mlp.up_proj.weight"].T
    u, g = ug[..., :I], ug[..., I:]
    return x + _ln(u * _gelu_tanh(g), eps) @ p["mlp.down_proj.weight"].T


def _layer_cfg():
    return ModelConfig(arch="ltg_bert", vocab_size=50, hidden_size=24, intermediate_size=20, num_hidden_layers=1,
                       num_attention_heads=3, max_position_embeddings=64, position_bucket_size=8,
                       max_relative_positions=24, layer_norm_eps=1e-7)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("causal", [False, True])
def test_layer_output_and_gradients_equal_the_equations(causal, impl):
    torch.manual_seed(0)
    cfg = _layer_cfg()
    B, T, H = 2, 40, cfg.hidden_size  # T > max_relative_positions: the log buckets and the cap are used
    layer = LtgBertLayer(cfg).double().eval()
    params = dict(layer.named_parameters())
    with torch.no_grad():
        for name, prm in params.items():  # random everything, LayerNorm affine and biases included
            prm.copy_(torch.randn_like(prm) * 0.3 + (1.0 if name.endswith("layer_norm.weight") else 0.0))
    x = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    rel = torch.randn(2 * cfg.position_bucket_size - 1, H, dtype=torch.float64, requires_grad=True)
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[1, 31:] = False  # right padding in the second sequence
    allowed = pad[:, None, :].expand(B, T, T)
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool).tril()
    mask = build_attention_mask(B, T, causal=causal, key_padding_mask=pad)
    index = relative_position_index(T, cfg.position_bucket_size, cfg.max_relative_positions)

    got = layer(x, rel, index, mask, impl=impl)
    ref = ref_layer(x, rel, params, cfg, allowed)
    assert (got - ref).abs().max().item() < 1e-10

    upstream = torch.randn_like(ref)
    leaves = [x, rel, *params.values()]
    g_got = torch.autograd.grad((got * upstream).sum(), leaves)
    g_ref = torch.autograd.grad((ref * upstream).sum(), leaves)
    for name, a, b in zip(["x", "relative", *params], g_got, g_ref):
        assert (a - b).abs().max().item() < 1e-9 * max(1.0, b.abs().max().item()), name


# ----------------------------------------------------------------------------- the whole model


def _tiny_model(**kw):
    base = dict(arch="ltg_bert", vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, position_bucket_size=8, max_relative_positions=24)
    base.update(kw)
    torch.manual_seed(0)
    return build_model(ModelConfig(**base)).eval()


def test_causal_mode_never_sees_the_future_and_bidirectional_does():
    m = _tiny_model()
    ids = torch.randint(5, 61, (2, 30))
    ids2 = ids.clone()
    ids2[:, 20:] = torch.randint(5, 61, (2, 10))
    with torch.no_grad():
        c1, c2 = m(ids, causal=True), m(ids2, causal=True)
        b1, b2 = m(ids, causal=False), m(ids2, causal=False)
    assert torch.equal(c1[:, :20], c2[:, :20])
    assert (b1[:, :20] - b2[:, :20]).abs().max() > 1e-3


def test_head_is_tied_and_loss_matches_logits():
    m = _tiny_model()
    big = [n for n, p in m.named_parameters() if p.shape[0] == 61]
    assert big == ["embedding.word_embedding.weight"]  # one (V, H) matrix: input and output
    ids = torch.randint(5, 61, (3, 25))
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    labels[1, 10:] = -100
    for causal in (True, False):
        with torch.no_grad():
            logits = m(ids, causal=causal)
            out = m(ids, labels=labels, causal=causal)
            h = m.classifier(m.encode(ids, causal=causal))
        assert torch.allclose(logits, h @ m.embedding.word_embedding.weight.T, atol=1e-6)
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        assert int(out.n_targets) == int((labels != -100).sum())
        assert float(out.loss_sum) == pytest.approx(float(ce), rel=1e-5)
    # gradients reach the tied matrix from both uses
    m.train()
    m(ids, labels=labels, causal=False).loss_sum.backward()
    assert m.embedding.word_embedding.weight.grad.abs().sum() > 0


def test_initialisation_and_config_checks():
    m = _tiny_model(hidden_size=64, intermediate_size=64, num_hidden_layers=3, vocab_size=4000)
    std = math.sqrt(2 / (5 * 64))
    w = m.embedding.word_embedding.weight
    assert w.abs().max() <= 2 * std + 1e-6
    assert w.std().item() == pytest.approx(std * 0.88, rel=0.05)  # a normal cut at ±2σ has std 0.88σ
    up = [layer.mlp.up_proj.weight.std().item() for layer in m.transformer.layers]
    assert up[0] / up[2] == pytest.approx(math.sqrt(3), rel=0.1)  # layer l scaled by sqrt(1 / (2 (l + 1)))
    assert all(not layer.attention.out_proj.bias.any() for layer in m.transformer.layers)
    with pytest.raises(ConfigError, match="triton"):
        load_recipe("ltg-bert-demo-cpu", ["model.attention=triton"])
    with pytest.raises(ConfigError, match="position_bucket_size"):
        load_recipe("ltg-bert-demo-cpu", ["model.position_bucket_size=7"])
    for name, size in [("ltg-bert-base-antlm", (768, 12, 12, 2048)), ("ltg-bert-base-mlm", (768, 12, 12, 2048))]:
        r = load_recipe(name)
        assert (r.model.hidden_size, r.model.num_hidden_layers, r.model.num_attention_heads,
                r.model.intermediate_size) == size and r.model.vocab_size == 16384
    a, b = load_recipe("ltg-bert-base-antlm").objective.schedule, load_recipe("ltg-bert-base-mlm").objective.schedule
    epochs = [sum(int(t.split("_")[0]) for t in s.split("+")) for s in (a, b)]
    assert epochs[0] == epochs[1] and a.startswith(tuple("0123456789")) and a.split("+")[0].endswith("CLM")


# ----------------------------------------------------------------------------- span masking

V, SPECIAL = 1000, [0, 1, 2, 3, 4]
PAD, EOS, MASK = 0, 2, 4


def _collator(**kw):
    args = dict(mask_id=MASK, pad_id=PAD, eos_id=EOS, special_ids=SPECIAL, vocab_size=V, seed=11)
    args.update(kw)
    return SpanMLMCollator(**args)


def test_span_fraction_and_length_histogram():
    c = _collator()
    n, T = 400, 512
    blocks = torch.randint(5, V, (n, T), generator=torch.Generator().manual_seed(0))
    batch = c(blocks, list(range(n)), 3)
    frac = (batch.labels != -100).float().mean().item()
    assert abs(frac - 0.15) < 0.01
    counts = torch.zeros(MAX_SPAN_LENGTH + 1)
    for i in range(n):
        g = torch.Generator().manual_seed(derive_seed(11, 3, i))
        selected, span_id, _ = c.span_selection(blocks[i], g)
        assert torch.equal(selected, batch.labels[i] != -100)
        ids = span_id[selected]
        ids = ids[ids != span_id[-1]]  # the span cut by the block end is shorter than drawn
        lengths = torch.bincount(ids)
        counts += torch.bincount(lengths[lengths > 0], minlength=MAX_SPAN_LENGTH + 1).float()
    total = counts.sum()
    expected = total * torch.tensor(capped_geometric_pmf())
    chi2 = (((counts[1:] - expected) ** 2) / expected).sum().item()
    assert total > 5000
    assert chi2 < 27.88, (chi2, counts)  # chi-square, 9 degrees of freedom, p = 0.001


def test_spans_never_cover_special_tokens_and_choices_are_per_span():
    c = _collator()
    g0 = torch.Generator().manual_seed(1)
    blocks = torch.randint(5, V, (300, 128), generator=g0)
    blocks[torch.rand(blocks.shape, generator=g0) < 0.12] = EOS  # frequent document ends
    blocks[:, 120:] = PAD
    batch = c(blocks, list(range(300)), 0)
    selected = batch.labels != -100
    assert not selected[blocks < 5].any()
    assert abs(selected.sum().item() / (blocks >= 5).sum().item() - 0.15) < 0.015
    masked_spans = n_spans = 0
    for i in range(300):
        sel, span_id, _ = c.span_selection(blocks[i], torch.Generator().manual_seed(derive_seed(11, 0, i)))
        for s in span_id[sel].unique().tolist():
            pos = (span_id == s).nonzero().squeeze(1)
            assert torch.equal(pos, torch.arange(pos[0], pos[-1] + 1))  # contiguous
            assert (blocks[i, pos[0]: pos[-1] + 1] >= 5).all()  # no special token inside or crossed
            is_mask = batch.input_ids[i, pos] == MASK
            assert is_mask.all() or not is_mask.any()  # one 80/10/10 choice per span
            masked_spans += int(is_mask.all())
            n_spans += 1
    assert abs(masked_spans / n_spans - 0.8) < 0.04


def test_span_masks_are_seeded_per_sample_and_next_position_labels():
    c = _collator()
    blocks = torch.randint(5, V, (4, 64), generator=torch.Generator().manual_seed(2))
    a = c(blocks, [10, 11, 12, 13], 1)
    b = c(blocks[[2, 0]], [12, 10], 1)
    assert torch.equal(a.input_ids[[2, 0]], b.input_ids) and torch.equal(a.labels[[2, 0]], b.labels)
    assert not torch.equal(c(blocks, [10, 11, 12, 13], 2).labels, a.labels)
    nxt = _collator(mlm_target="next_position")(blocks, [10, 11, 12, 13], 1)
    assert torch.equal(nxt.input_ids, a.input_ids)
    assert torch.equal(nxt.labels[:, :-1], a.labels[:, 1:])


# ----------------------------------------------------------------------------- WordPiece and export


@pytest.fixture(scope="module")
def wordpiece_tokenizer(tmp_path_factory):
    from antlm_dist.data.corpus import find_corpus
    from antlm_dist.data.tokenizer import save_tokenizer, train_tokenizer

    return save_tokenizer(train_tokenizer(find_corpus("bundled").train[:2], 512, 2, "wordpiece"),
                          tmp_path_factory.mktemp("wordpiece"))


def test_wordpiece_roles_and_reproducible_training(wordpiece_tokenizer, tmp_path):
    from antlm_dist.data.corpus import find_corpus
    from antlm_dist.data.tokenizer import load_tokenizer, special_token_ids, train_tokenizer
    from antlm_dist.data.pipeline import make_collators

    tok = load_tokenizer(wordpiece_tokenizer)  # kind detected from the vocabulary
    assert tok.convert_ids_to_tokens(special_token_ids(tok)) == ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    assert len(tok) == 512 and special_token_ids(tok) == [0, 1, 2, 3, 4]
    # the alphabet gets canonical ids (the trainer numbers "##x" in hash order)
    vocab = tok.get_vocab()
    alphabet = sorted((i, t) for t, i in vocab.items() if len(t) == 1 or (t.startswith("##") and len(t) == 3))
    singles = [t for _, t in alphabet if len(t) == 1]
    conts = [t for _, t in alphabet if len(t) == 3]
    assert [i for i, _ in alphabet] == list(range(5, 5 + len(alphabet)))
    assert singles == sorted(singles) and conts == sorted(conts) and len(conts) > 20
    again = train_tokenizer(find_corpus("bundled").train[:2], 512, 2, "wordpiece").get_vocab()
    assert {t: i for t, i in again.items() if i < 5 + len(alphabet)} == {t: i for t, i in vocab.items() if i < 5 + len(alphabet)}
    recipe = load_recipe("ltg-bert-demo-cpu", ["model.vocab_size=512"])
    clm, mlm = make_collators(recipe, tok)
    assert isinstance(mlm, SpanMLMCollator) and mlm.mask_id == 4 and clm.eos_id == 2
    assert mlm.is_special[:5].all() and not mlm.is_special[5:].any()


def test_export_loads_offline_through_the_auto_classes(wordpiece_tokenizer, tmp_path, monkeypatch):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from antlm_dist.export import write_hf_folder
    from antlm_dist.model.hf_auto import LtgBertHFForMaskedLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = load_recipe("ltg-bert-demo-cpu", ["model.vocab_size=512", "model.hidden_size=32",
                                               "model.intermediate_size=48", "model.num_hidden_layers=2",
                                               "model.num_attention_heads=2"])
    torch.manual_seed(0)
    model = build_model(recipe.model).eval()
    out = write_hf_folder(tmp_path / "hf", recipe, model.state_dict(), wordpiece_tokenizer.parent, {"step": 0})
    ids = torch.randint(5, 512, (2, 21))
    registered = AutoModelForMaskedLM.from_pretrained(str(out)).eval()  # classes registered on import
    # our class, or the folder's copy of it when an earlier test in this process loaded a folder
    # with trust_remote_code (transformers then maps the model type to the remote class)
    assert type(registered).__name__ == LtgBertHFForMaskedLM.__name__
    with torch.no_grad():
        ref = {"bi": model(ids, causal=False), "ca": model(ids, causal=True)}
        assert (registered(ids).logits - ref["bi"]).abs().max().item() < 1e-5
        assert (registered(ids, causal=True).logits - ref["ca"]).abs().max().item() < 1e-5
    # a fresh interpreter that has not imported antlm_dist: the code copied into out/ via auto_map
    torch.save({"ids": ids, **ref}, tmp_path / "ref.pt")
    script = (
        "import torch\n"
        "from transformers import AutoModelForMaskedLM\n"
        f"ref = torch.load({str(tmp_path / 'ref.pt')!r})\n"
        f"m = AutoModelForMaskedLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()\n"
        "assert type(m).__module__.startswith('transformers_modules'), type(m).__module__\n"
        "with torch.no_grad():\n"
        "    d = [(m(ref['ids'], causal=c).logits - ref[k]).abs().max().item() for c, k in ((False, 'bi'), (True, 'ca'))]\n"
        "assert max(d) < 1e-5, d\n"
        "print('OK')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.mask_token == "[MASK]" and tok.pad_token_id == 0 and tok.eos_token == "[SEP]"
    assert json.loads((out / "config.json").read_text())["antlm"]["recipe"]["model"]["arch"] == "ltg_bert"


# ----------------------------------------------------------------------------- 2 ranks, both phases


@pytest.fixture(scope="module", params=["zero2.json", "zero3.json"])
def ltg_run(request, tmp_path_factory, wordpiece_tokenizer, data_cache):
    out = tmp_path_factory.mktemp("ltg_run") / "run"
    proc = run_cli(["--config", "ltg-bert-demo-cpu", "--output-dir", str(out), *TINY, "eval.at_start=true",
                    f"tokenizer.path={wordpiece_tokenizer}", f"data.cache_dir={data_cache}",
                    f"distributed.deepspeed_config={request.param}"])
    assert_ok(proc)
    return request.param, out


@pytest.mark.slow
def test_ltg_bert_trains_across_phase_switches_under_zero(ltg_run):
    ds_config, out = ltg_run
    train = {r["step"]: r["phase"] for r in read_metrics(out / "metrics.jsonl", "train")}
    assert [train[s] for s in range(1, 13)] == ["CLM"] * 4 + ["MLM"] * 4 + ["CLM"] * 4
    evals = read_metrics(out / "metrics.jsonl", "eval")
    assert [e["step"] for e in evals] == [0, 4, 8, 12]
    assert evals[-1]["clm_loss"] < evals[0]["clm_loss"] - 0.05
    assert evals[-1]["mlm_loss"] < evals[0]["mlm_loss"] - 0.05
    summary = json.loads((out / "summary.json").read_text())
    assert summary["zero_stage"] == int(ds_config[4]) and summary["world_size"] == 2
    assert (out / "checkpoints" / "step00000012" / "COMPLETE").is_file()


@pytest.mark.slow
def test_trained_checkpoint_exports_and_scores(ltg_run, tmp_path):
    from transformers import AutoModelForMaskedLM

    from antlm_dist.eval.blimp import clm_scores, pll_scores
    from antlm_dist.export import export_checkpoint, load_pretrained

    _, out = ltg_run
    folder = export_checkpoint(out / "checkpoints", tmp_path / "hf")
    model, tok = load_pretrained(folder)
    hf = AutoModelForMaskedLM.from_pretrained(str(folder)).eval()
    ids = torch.tensor([tok("The cat sat on the mat.", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        for causal in (False, True):
            assert (hf(ids, causal=causal).logits - model(ids, causal=causal)).abs().max().item() < 1e-5
    sentences = ["The cat sat on the mat.", "The cat sat the on mat."]
    for scores in (clm_scores(model, tok, sentences), pll_scores(model, tok, sentences)):
        assert len(scores) == 2 and all(math.isfinite(x) and x < 0 for x in scores)
