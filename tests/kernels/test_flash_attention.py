"""Tests for the Triton flash-attention kernel (kernels/flash_attention.py).

On CPU the kernels run in the Triton interpreter (tests/kernels/conftest.py sets
TRITON_INTERPRET=1 before any kernel module is imported; it is set here too for a
direct run). Every output buffer is NaN-filled before launch, so an element a kernel
forgets to write fails the comparison. The oracle is the torch reference in float64.
"""
import importlib
import os
import subprocess
import sys
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported

import pytest
import torch

import antlm_dist.kernels as kernels_pkg
from antlm_dist.kernels import flash_attention as _fa_entry  # noqa: F401  (the public import path)
from antlm_testutil import REPO, assert_compile_for_sm90

fa = importlib.import_module("antlm_dist.kernels.flash_attention")
if fa.HAS_TRITON and not fa.BUILT_FOR_INTERPRETER and fa._interpreting() and not torch.cuda.is_available():
    # Another test module imported the kernels before TRITON_INTERPRET was set: rebuild
    # them as interpreter functions.
    fa = importlib.reload(fa)
    importlib.reload(kernels_pkg)

from antlm_dist.kernels import flash_attention, flash_attention_ref  # noqa: E402

ON_CUDA = torch.cuda.is_available() and not fa.BUILT_FOR_INTERPRETER
DEVICE = "cuda" if ON_CUDA else "cpu"
TRITON_RUNS = fa.HAS_TRITON and (ON_CUDA or fa.BUILT_FOR_INTERPRETER)
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1 with triton installed")
BF16_REASON = "the Triton interpreter computes bf16 wrongly"

TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3}
SEQ_LENS = (1, 17, 64, 100, 129)
HEAD_DIMS = (32, 64)
# name -> (causal, padding, segments)
MODES = {
    "causal": (True, False, False),
    "bidirectional": (False, False, False),
    "causal-padding": (True, True, False),
    "bidirectional-padding": (False, True, False),
    "causal-segments-padding": (True, True, True),
}


@pytest.fixture(autouse=True)
def _nan_filled_buffers(monkeypatch):
    monkeypatch.setattr(fa, "NAN_FILL_BUFFERS", True)


def _generator(*case) -> torch.Generator:
    """A fresh, reproducible stream per test case."""
    return torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))


def _qkv(gen, batch, heads, kv_heads, seq_len, head_dim, dtype):
    shapes = ((batch, heads, seq_len, head_dim), (batch, kv_heads, seq_len, head_dim), (batch, kv_heads, seq_len, head_dim))
    return [torch.randn(s, generator=gen).to(device=DEVICE, dtype=dtype).requires_grad_() for s in shapes]


def _padding(gen, batch, seq_len):
    """(B, T) bool: row 0 right-padded, row 1 left-padded, at least one real token each."""
    real = torch.ones(batch, seq_len, dtype=torch.bool)
    for b in range(batch):
        n_real = int(torch.randint(max(1, seq_len // 3), seq_len + 1, (1,), generator=gen)) if seq_len > 1 else 1
        if b == 0 and seq_len > 1:
            n_real = min(n_real, seq_len - 1)  # padding is always exercised
        if b % 2 == 0:
            real[b, n_real:] = False
        else:
            real[b, : seq_len - n_real] = False
    return real.to(DEVICE)


def _segments(gen, batch, seq_len):
    """(B, T) int64 packed-document ids, a new document with probability 0.15 per token."""
    starts = torch.rand(batch, seq_len, generator=gen) < 0.15
    return torch.cumsum(starts.long(), dim=1).to(DEVICE)


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative L2 error. A gradient that vanishes in exact arithmetic (one allowed key
    per row, e.g. T = 1) is measured at the scale of unit-variance data instead of 0."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    floor = 0.05 * expected.numel() ** 0.5
    return ((actual - expected).norm() / max(expected.norm().item(), floor)).item()


def _forward_backward(fn, q, k, v, do, **kwargs):
    out = fn(q, k, v, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return (out, *grads)


def _oracle(q, k, v, do, **kwargs):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    return _forward_backward(flash_attention_ref, q64, k64, v64, do.double(), **kwargs)


def _check_against_oracle(results, q, k, v, do, tol, **kwargs):
    expected = _oracle(q, k, v, do, **kwargs)
    for name, got, want in zip(("out", "dq", "dk", "dv"), results, expected):
        assert got.shape == want.shape, name
        assert torch.isfinite(got).all(), f"{name} has NaN/inf (unwritten or overflowed elements)"
        err = _rel_err(got, want)
        assert err <= tol, f"{name}: relative L2 error {err:.3e} > {tol:.0e}"


def _mode_case(gen, mode, heads, seq_len, head_dim, dtype, *, kv_heads):
    """q, k, v (2, heads|kv_heads, T, D), dO and the mask kwargs of one entry of MODES."""
    causal, padded, packed = MODES[mode]
    q, k, v = _qkv(gen, 2, heads, kv_heads, seq_len, head_dim, dtype)
    kwargs = dict(
        causal=causal,
        key_padding_mask=_padding(gen, 2, seq_len) if padded else None,
        segment_ids=_segments(gen, 2, seq_len) if packed else None,
    )
    do = torch.randn(q.shape, generator=gen).to(device=DEVICE, dtype=dtype)
    return q, k, v, do, kwargs


@needs_triton
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matches_float64_reference(dtype, seq_len, head_dim, mode):
    gen = _generator("main", dtype, seq_len, head_dim, mode)
    q, k, v, do, kwargs = _mode_case(gen, mode, 2, seq_len, head_dim, dtype, kv_heads=2)
    results = _forward_backward(flash_attention, q, k, v, do, backend="triton", **kwargs)
    _check_against_oracle(results, q, k, v, do, TOLERANCE[dtype], **kwargs)
    if kwargs["key_padding_mask"] is not None:
        pad_rows = ~kwargs["key_padding_mask"]
        assert (results[0].permute(0, 2, 1, 3)[pad_rows] == 0).all(), "padded query rows must be exact zeros"


@needs_triton
@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_grouped_query_strided_inputs_and_scale(kv_heads, causal):
    """GQA (4 query heads over 1 or 2 kv heads), q/k/v as transposed views of
    (B, T, H, D) projections (the model's layout), and a non-default softmax scale."""
    gen = _generator("gqa", kv_heads, causal)
    batch, heads, seq_len, head_dim = 2, 4, 100, 32
    q = torch.randn(batch, seq_len, heads, head_dim, generator=gen).to(DEVICE).transpose(1, 2).requires_grad_()
    k = torch.randn(batch, seq_len, kv_heads, head_dim, generator=gen).to(DEVICE).transpose(1, 2).requires_grad_()
    v = torch.randn(batch, seq_len, kv_heads, head_dim, generator=gen).to(DEVICE).transpose(1, 2).requires_grad_()
    kwargs = dict(causal=causal, softmax_scale=0.3, key_padding_mask=_padding(gen, batch, seq_len))
    do = torch.randn(q.shape, generator=gen).to(DEVICE)
    results = _forward_backward(flash_attention, q, k, v, do, backend="triton", **kwargs)
    assert results[2].shape == k.shape and results[3].shape == v.shape
    _check_against_oracle(results, q, k, v, do, TOLERANCE[torch.float32], **kwargs)


@needs_triton
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "segments"])
def test_fully_padded_row_gives_zeros_and_no_nan(causal, packed):
    gen = _generator("empty-row", causal, packed)
    seq_len = 33
    q, k, v = _qkv(gen, 2, 2, 2, seq_len, 32, torch.float32)
    kpm = _padding(gen, 2, seq_len)
    kpm[1] = False  # the whole second sequence is padding
    kwargs = dict(causal=causal, key_padding_mask=kpm, segment_ids=_segments(gen, 2, seq_len) if packed else None)
    do = torch.randn(q.shape, generator=gen).to(DEVICE)
    out, dq, dk, dv = _forward_backward(flash_attention, q, k, v, do, backend="triton", **kwargs)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), f"{name} has NaN/inf"
        assert (t[1] == 0).all(), f"{name} of the fully padded sequence must be zeros"
    _check_against_oracle((out, dq, dk, dv), q, k, v, do, TOLERANCE[torch.float32], **kwargs)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_padded_queries_do_not_leak_into_gradients(backend, causal):
    """dO at padded query positions must not change any gradient of real tokens."""
    gen = _generator("leak", backend, causal)
    seq_len = 100
    q, k, v = _qkv(gen, 2, 2, 2, seq_len, 32, torch.float32)
    kpm = _padding(gen, 2, seq_len)
    do = torch.randn(q.shape, generator=gen).to(DEVICE)
    do_perturbed = do + 100.0 * (~kpm)[:, None, :, None] * torch.randn(q.shape, generator=gen).to(DEVICE)
    base = _forward_backward(flash_attention, q, k, v, do, backend=backend, causal=causal, key_padding_mask=kpm)
    moved = _forward_backward(flash_attention, q, k, v, do_perturbed, backend=backend, causal=causal, key_padding_mask=kpm)
    real = kpm[:, None, :, None]
    for name, a, b in zip(("dq", "dk", "dv"), base[1:], moved[1:]):
        assert torch.equal(a * real, b * real), f"{name} of real tokens changed with dO at padded positions"
        assert (b * ~real == 0).all(), f"{name} at padded positions must be zero"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mode", list(MODES))
def test_torch_reference_path_matches_float64(dtype, mode):
    gen = _generator("torch-path", dtype, mode)
    q, k, v, do, kwargs = _mode_case(gen, mode, 4, 100, 32, dtype, kv_heads=2)
    results = _forward_backward(flash_attention, q, k, v, do, backend="torch", **kwargs)
    _check_against_oracle(results, q, k, v, do, TOLERANCE[dtype], **kwargs)


@needs_triton
def test_model_attention_triton_impl_matches_eager():
    """The model's ``attention(impl="triton")`` contract: same output as its eager path."""
    attention_mod = pytest.importorskip("antlm_dist.model.attention")
    gen = _generator("model-attention")
    seq_len = 40
    q, k, v = (t.detach() for t in _qkv(gen, 2, 4, 2, seq_len, 32, torch.float32))
    kwargs = dict(causal=True, key_padding_mask=_padding(gen, 2, seq_len), segment_ids=_segments(gen, 2, seq_len))
    got = attention_mod.attention(q, k, v, impl="triton", **kwargs)
    want = attention_mod.attention(q.double(), k.double(), v.double(), impl="eager", **kwargs)
    assert _rel_err(got, want) <= TOLERANCE[torch.float32]


@pytest.mark.skipif(not (torch.cuda.is_available() and fa.HAS_TRITON and not fa.BUILT_FOR_INTERPRETER), reason=BF16_REASON)
@pytest.mark.parametrize("seq_len", [100, 256])
@pytest.mark.parametrize("mode", list(MODES))
def test_bf16_error_within_twice_torch_error(mode, seq_len):
    """GPU only: the kernel's bf16 error against float64 is at most ~2x torch's own bf16 error."""
    causal, padded, packed = MODES[mode]
    gen = _generator("bf16", mode, seq_len)
    q, k, v = _qkv(gen, 2, 4, 2, seq_len, 64, torch.bfloat16)
    kwargs = dict(
        causal=causal,
        key_padding_mask=_padding(gen, 2, seq_len) if padded else None,
        segment_ids=_segments(gen, 2, seq_len) if packed else None,
    )
    do = torch.randn(q.shape, generator=gen).to(device=DEVICE, dtype=torch.bfloat16)
    ours = _forward_backward(flash_attention, q, k, v, do, backend="triton", **kwargs)
    theirs = _forward_backward(flash_attention, q, k, v, do, backend="torch", **kwargs)
    expected = _oracle(q, k, v, do, **kwargs)
    for name, a, b, want in zip(("out", "dq", "dk", "dv"), ours, theirs, expected):
        assert torch.isfinite(a).all(), name
        err, torch_err = _rel_err(a, want), _rel_err(b, want)
        assert err <= 2.0 * torch_err + 1e-3, f"{name}: kernel bf16 error {err:.2e} vs torch {torch_err:.2e}"


def _small(dtype=torch.float32, head_dim=32, heads=2, kv_heads=2, seq_len=8):
    q = torch.randn(2, heads, seq_len, head_dim, dtype=dtype)
    k = torch.randn(2, kv_heads, seq_len, head_dim, dtype=dtype)
    return q, k, k.clone()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: _small(dtype=torch.float64), "q.dtype"),
        (lambda: _small(head_dim=48), "head_dim=48"),
        (lambda: _small(heads=3, kv_heads=2), "multiple of k/v heads"),
        (lambda: (torch.randn(2, 2, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8)), "q must be a 4-d tensor"),
        (lambda: (_small()[0], *_small(seq_len=9)[1:]), "does not match q shape"),
        (lambda: (*_small()[:2], _small()[1].half()), "share a dtype"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(make, match):
    q, k, v = make()
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, causal=True)


def test_bad_masks_and_backend_raise_value_error():
    q, k, v = _small()
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        flash_attention(q, k, v, causal=False, key_padding_mask=torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="segment_ids must be an integer tensor"):
        flash_attention(q, k, v, causal=False, segment_ids=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="backend='cuda' is not known"):
        flash_attention(q, k, v, causal=False, backend="cuda")


@needs_triton
def test_auto_backend_uses_triton_where_it_can_run():
    q = torch.empty(1, 1, 1, 32, device=DEVICE)
    assert fa._use_triton(q, "auto")
    assert not fa._use_triton(q, "torch")


@needs_triton
def test_benchmark_cpu_smoke_runs(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_attention.py"), "--cpu-smoke", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| seq |" in proc.stdout
    import json

    report = json.loads(out.read_text())
    assert report["rows"] and all("triton_fwd_tflops" in row for row in report["rows"])


@needs_triton
def test_triton_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """Every kernel, with every GPU autotune config, lowered through Triton's CUDA backend
    and ptxas (no GPU needed): bf16 causal with padding, segments and a ragged length, and
    fp32 bidirectional with no mask."""
    specs = []
    for dtype, precision, causal, masks in (("bf16", "tf32", True, True), ("fp32", "ieee", False, False)):
        tensors = {name: "*" + dtype for name in ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr")}
        types = {**tensors, "lse_ptr": "*fp32", "delta_ptr": "*fp32", "kpm_ptr": "*u8", "seg_ptr": "*i32",
                 "softmax_scale": "fp32"}
        flags = {"GROUPS": 2, "HEAD_DIM": 64, "IS_CAUSAL": causal, "EVEN": not masks, "HAS_PADDING": masks,
                 "HAS_SEGMENTS": masks, "INPUT_PRECISION": precision}
        specs += [{"module": fa.__name__, "kernel": name, "types": types, "constants": flags, "autotune_configs": True}
                  for name in ("_flash_attn_fwd_kernel", "_flash_attn_bwd_dkdv_kernel", "_flash_attn_bwd_dq_kernel")]
        specs.append({"module": fa.__name__, "kernel": "_flash_attn_bwd_preprocess_kernel", "types": types,
                      "constants": {"HEAD_DIM": 64, "BLOCK_M": 128}})
    assert_compile_for_sm90(specs, tmp_path)
