"""Tests for kernels/masked_token_loss.py against a float64 oracle.

The Triton path runs under the Triton interpreter on CPU (tests/kernels/conftest.py
sets TRITON_INTERPRET=1 before this module imports the kernel); on a GPU machine
with TRITON_INTERPRET=0 it runs compiled on CUDA tensors.
"""

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from antlm_dist.kernels import masked_token_loss, masked_token_loss_ref
from antlm_dist.telemetry.memory import cpu_peak_allocated_bytes
from antlm_testutil import assert_compile_for_sm90

# the package re-exports the function under the module's name; fetch the module itself
mtl = importlib.import_module("antlm_dist.kernels.masked_token_loss")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
TRITON_OK = mtl._HAS_TRITON and (HAS_CUDA or INTERPRET)
BF16_REASON = "the Triton interpreter computes bf16 wrongly"

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def _device(backend):
    if backend == "triton" and HAS_CUDA and not INTERPRET:
        return "cuda"
    return "cpu"


def _skip_unsupported(backend, dtype):
    if backend == "triton":
        if not TRITON_OK:
            pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
        if dtype == torch.bfloat16 and (not HAS_CUDA or INTERPRET):
            pytest.skip(BF16_REASON)


def _oracle(hidden, weight, labels, *, ignore_index=-100, reduction="sum", z_loss=0.0):
    """float64 loss, grads of hidden and weight, n_targets, n_correct from the full logits."""
    h = hidden.detach().cpu().double().requires_grad_()
    w = weight.detach().cpu().double().requires_grad_()
    y = labels.detach().cpu().reshape(-1).long()
    logits = h.reshape(-1, h.shape[-1]) @ w.t()
    keep = y != ignore_index
    loss = F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum")
    loss = loss + z_loss * (torch.logsumexp(logits, 1).square() * keep).sum()
    n = int(keep.sum())
    if reduction == "mean":
        loss = loss / max(n, 1)
    loss.backward()
    n_correct = int(((logits.argmax(1) == y) & keep).sum())
    return loss.detach(), h.grad, w.grad, n, n_correct


def _rel(a, b):
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _make(shape, hidden_dim, vocab, *, target_frac, dtype, device, seed=0):
    """hidden shape + (hidden_dim,), weight (vocab, hidden_dim), labels of `shape` with -100 holes."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, hidden_dim, generator=g)
    weight = torch.randn(vocab, hidden_dim, generator=g) / hidden_dim**0.5
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) >= target_frac] = -100
    return (
        hidden.to(device=device, dtype=dtype).requires_grad_(),
        weight.to(device=device, dtype=dtype).requires_grad_(),
        labels.to(device),
    )


# (shape of labels, H, V, fraction of targets); V is never a multiple of the vocab tile.
CASES = {
    "mlm_3d": ((2, 33), 48, 200, 0.15),
    "clm_all_targets": ((2, 16), 32, 97, 1.0),
    "single_target": ((1, 40), 32, 130, 0.0),  # one label set below
    "all_ignored": ((2, 9), 32, 70, 0.0),
    "rows_2d": ((50,), 40, 130, 0.5),
    "odd_hidden": ((3, 7), 37, 65, 0.6),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_float64_oracle(backend, dtype, case):
    _skip_unsupported(backend, dtype)
    shape, hidden_dim, vocab, frac = CASES[case]
    hidden, weight, labels = _make(shape, hidden_dim, vocab, target_frac=frac, dtype=dtype, device=_device(backend))
    if case == "single_target":
        labels.view(-1)[17] = 5
    # chunk_size=8 makes the torch path cross several chunks, including a ragged last one
    loss, n_targets = masked_token_loss(hidden, weight, labels, backend=backend, chunk_size=8)
    loss.backward()
    ref_loss, ref_dh, ref_dw, ref_n, _ = _oracle(hidden, weight, labels)

    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert n_targets.dtype == torch.int64 and int(n_targets) == ref_n
    assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype
    assert hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape
    if ref_n == 0:
        assert float(loss.detach()) == 0.0
        assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0
        return
    tol = TOL[dtype]
    assert abs(float(loss.detach()) - float(ref_loss)) <= tol * abs(float(ref_loss))
    assert _rel(hidden.grad, ref_dh) <= tol
    assert _rel(weight.grad, ref_dw) <= tol
    # rows without a label get exactly zero gradient
    ignored = (labels == -100).cpu()
    assert torch.count_nonzero(hidden.grad.cpu()[ignored]) == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_reduction_mean_and_z_loss(backend):
    _skip_unsupported(backend, torch.float32)
    for reduction, z_loss in [("mean", 0.0), ("sum", 1e-2), ("mean", 1e-3)]:
        hidden, weight, labels = _make((3, 21), 32, 150, target_frac=0.4, dtype=torch.float32, device=_device(backend))
        loss, n = masked_token_loss(hidden, weight, labels, reduction=reduction, z_loss=z_loss, backend=backend, chunk_size=16)
        loss.backward()
        ref_loss, ref_dh, ref_dw, ref_n, _ = _oracle(hidden, weight, labels, reduction=reduction, z_loss=z_loss)
        assert int(n) == ref_n
        assert abs(float(loss.detach()) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss)), (reduction, z_loss)
        assert _rel(hidden.grad, ref_dh) <= 1e-5 and _rel(weight.grad, ref_dw) <= 1e-5, (reduction, z_loss)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mean_with_no_targets_is_zero(backend):
    _skip_unsupported(backend, torch.float32)
    hidden, weight, labels = _make((2, 5), 32, 40, target_frac=0.0, dtype=torch.float32, device=_device(backend))
    loss, n = masked_token_loss(hidden, weight, labels, reduction="mean", z_loss=1e-3, backend=backend)
    loss.backward()
    assert int(n) == 0 and float(loss.detach()) == 0.0
    assert torch.isfinite(hidden.grad).all() and torch.count_nonzero(weight.grad) == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_accuracy_matches_argmax_of_full_logits(backend):
    _skip_unsupported(backend, torch.float32)
    device = _device(backend)
    g = torch.Generator().manual_seed(3)
    vocab, hidden_dim = 90, 32
    weight = torch.randn(vocab, hidden_dim, generator=g)
    labels = torch.randint(0, vocab, (4, 20), generator=g)
    # hidden leans towards its label's row, so a good share (not all) of rows are correct
    hidden = 0.35 * weight[labels] + torch.randn(4, 20, hidden_dim, generator=g)
    labels[torch.rand(4, 20, generator=g) < 0.3] = -100
    hidden, weight, labels = hidden.to(device), weight.to(device), labels.to(device)
    loss, n, n_correct = masked_token_loss(hidden, weight, labels, return_accuracy=True, backend=backend, chunk_size=8)
    _, _, _, ref_n, ref_correct = _oracle(hidden, weight, labels)
    assert n_correct.dtype == torch.int64 and int(n) == ref_n
    assert 0 < ref_correct < ref_n
    assert int(n_correct) == ref_correct


def test_reference_matches_oracle():
    hidden, weight, labels = _make((2, 19), 32, 110, target_frac=0.5, dtype=torch.float32, device="cpu")
    loss, n, n_correct = masked_token_loss_ref(hidden, weight, labels, z_loss=1e-3, return_accuracy=True)
    loss.backward()
    ref_loss, ref_dh, ref_dw, ref_n, ref_correct = _oracle(hidden, weight, labels, z_loss=1e-3)
    assert int(n) == ref_n and int(n_correct) == ref_correct
    assert abs(float(loss.detach()) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    assert _rel(hidden.grad, ref_dh) <= 1e-5 and _rel(weight.grad, ref_dw) <= 1e-5


@pytest.mark.parametrize("bad_label, ignore_index", [(70, -100), (-1, -100), (-100, -1), (1000, -100)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_out_of_range_label_raises_before_compute(backend, bad_label, ignore_index, monkeypatch):
    _skip_unsupported(backend, torch.float32)

    def no_compute(*args, **kwargs):
        raise AssertionError("compute started before the labels were checked")

    monkeypatch.setattr(mtl.MaskedTokenLossFunction, "apply", no_compute)
    hidden, weight, labels = _make((2, 6), 16, 70, target_frac=0.5, dtype=torch.float32, device=_device(backend))
    labels[1, 2] = bad_label
    with pytest.raises(ValueError, match=r"labels.*\[0, 70\)"):
        masked_token_loss(hidden, weight, labels, ignore_index=ignore_index, backend=backend)


def test_shape_and_argument_errors_name_the_argument():
    hidden, weight, labels = _make((2, 6), 16, 30, target_frac=0.5, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="weight"):
        masked_token_loss(hidden, weight[:, :8], labels)
    with pytest.raises(ValueError, match="labels"):
        masked_token_loss(hidden, weight, labels[:, :5])
    with pytest.raises(ValueError, match="labels"):
        masked_token_loss(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="hidden"):
        masked_token_loss(hidden[None], weight, labels[None])
    with pytest.raises(ValueError, match="hidden"):
        masked_token_loss(hidden.double(), weight, labels)
    with pytest.raises(ValueError, match="reduction"):
        masked_token_loss(hidden, weight, labels, reduction="none")
    with pytest.raises(ValueError, match="backend"):
        masked_token_loss(hidden, weight, labels, backend="cuda")
    with pytest.raises(ValueError, match="z_loss"):
        masked_token_loss(hidden, weight, labels, z_loss=-1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        masked_token_loss(hidden, weight, labels, chunk_size=0)


def test_auto_backend_choice():
    cpu = torch.device("cpu")
    assert mtl._use_triton("auto", cpu) == (mtl._HAS_TRITON and INTERPRET)
    assert mtl._use_triton("torch", cpu) is False
    assert mtl._use_triton("auto", torch.device("cuda")) == mtl._HAS_TRITON


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_frozen_head_no_grad_and_mixed_dtypes(backend):
    _skip_unsupported(backend, torch.float16)
    device = _device(backend)
    hidden, weight, labels = _make((2, 12), 32, 75, target_frac=0.5, dtype=torch.float16, device=device)
    weight32 = weight.detach().float()  # frozen fp32 head, fp16 hidden
    loss, _ = masked_token_loss(hidden, weight32, labels, backend=backend)
    loss.backward()
    ref_loss, ref_dh, _, _, _ = _oracle(hidden, weight32, labels)
    assert hidden.grad.dtype == torch.float16 and weight32.grad is None
    assert _rel(hidden.grad, ref_dh) <= 5e-3
    with torch.no_grad():
        loss_ng, _ = masked_token_loss(hidden, weight32, labels, backend=backend)
    assert loss_ng.grad_fn is None and abs(float(loss_ng.detach()) - float(ref_loss)) <= 5e-3 * abs(float(ref_loss))


def test_torch_path_backward_with_retain_graph_is_repeatable():
    hidden, weight, labels = _make((2, 10), 16, 40, target_frac=0.5, dtype=torch.float32, device="cpu")
    loss, _ = masked_token_loss(hidden, weight, labels, backend="torch")
    g1 = torch.autograd.grad(2.0 * loss, (hidden, weight), retain_graph=True)
    g2 = torch.autograd.grad(2.0 * loss, (hidden, weight))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    _, ref_dh, ref_dw, _, _ = _oracle(hidden, weight, labels)
    assert _rel(g1[0], 2.0 * ref_dh) <= 1e-5 and _rel(g1[1], 2.0 * ref_dw) <= 1e-5


def test_torch_path_peak_memory_does_not_scale_with_rows_times_vocab():
    rows, hidden_dim, vocab, chunk = 2048, 16, 4096, 64
    full_logits_bytes = rows * vocab * 4  # 32 MiB
    hidden, weight, labels = _make((rows,), hidden_dim, vocab, target_frac=1.0, dtype=torch.float32, device="cpu")

    def ours():
        loss, _ = masked_token_loss(hidden, weight, labels, backend="torch", chunk_size=chunk)
        torch.autograd.grad(loss, (hidden, weight))

    def naive():
        loss, _ = masked_token_loss_ref(hidden, weight, labels)
        torch.autograd.grad(loss, (hidden, weight))

    # the measurement sees the naive formulation's full logits ...
    assert cpu_peak_allocated_bytes(naive) >= full_logits_bytes
    # ... and ours stays within its O(chunk*V + rows*H + V*H) working set, with 2x slack
    bound = 2 * 4 * (chunk * vocab + 3 * rows * hidden_dim + 3 * vocab * hidden_dim) + (1 << 20)
    peak = cpu_peak_allocated_bytes(ours)
    assert peak <= bound < full_logits_bytes / 4, (peak, bound)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRET or not mtl._HAS_TRITON, reason=BF16_REASON)
def test_triton_bf16_error_within_twice_torch_bf16_error():
    hidden, weight, labels = _make((4, 128), 64, 1000, target_frac=0.3, dtype=torch.bfloat16, device="cuda")
    loss, _ = masked_token_loss(hidden, weight, labels, backend="triton")
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    ref_loss, ref_dh, ref_dw, _, _ = _oracle(hidden, weight, labels)
    naive_loss, _ = masked_token_loss_ref(hidden, weight, labels)
    ndh, ndw = torch.autograd.grad(naive_loss, (hidden, weight))
    assert _rel(dh, ref_dh) <= 2 * _rel(ndh, ref_dh) + 1e-3
    assert _rel(dw, ref_dw) <= 2 * _rel(ndw, ref_dw) + 1e-3
    assert abs(float(loss.detach()) - float(ref_loss)) <= 2 * abs(float(naive_loss.detach()) - float(ref_loss)) + 1e-3 * abs(float(ref_loss))


@pytest.mark.skipif(not mtl._HAS_TRITON, reason="needs triton")
def test_triton_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """Lower both kernels through Triton's CUDA backend and ptxas (no GPU needed) for fp32 and bf16."""
    specs = []
    for dtype, precision in (("fp32", "ieee"), ("bf16", None)):
        common = {"h_ptr": "*" + dtype, "w_ptr": "*" + dtype, "y_ptr": "*i64", "lse_ptr": "*fp32"}
        blocks = {"stride_hk": 1, "stride_wk": 1, "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64,
                  "DOT_PRECISION": precision}
        specs += [
            {"module": mtl.__name__, "kernel": "_masked_token_loss_fwd_kernel",
             "types": {**common, "tgt_ptr": "*fp32", "argmax_ptr": "*i64"},
             "constants": {**blocks, "RETURN_ARGMAX": True}},
            {"module": mtl.__name__, "kernel": "_masked_token_loss_bwd_kernel",
             "types": {**common, "grad_ptr": "*fp32", "dh_ptr": "*fp32", "dw_ptr": "*fp32", "z_loss": "fp32"},
             "constants": {**blocks, "COMPUTE_DH": True, "COMPUTE_DW": True}},
        ]
    assert_compile_for_sm90(specs, tmp_path)
