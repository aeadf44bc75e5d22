"""Fused masked-token loss: LM head matmul + cross-entropy on the target rows only.

One loss serves both AntLM phases. Labels are aligned to positions:
``labels[b, t]`` is the token that the hidden state at position t must
predict, and ``ignore_index`` (-100) marks positions without a loss. (CLM:
``labels[t] = input_ids[t + 1]``; MLM: the original token where t was
selected. Hugging Face's causal ``labels`` are unshifted; these are not.)

Algorithm (shared by the Triton path and the torch path):

1. Row compaction: gather the M rows whose label is not ``ignore_index``
   before any matmul, so an MLM step (about 15 % targets) pays for 15 % of
   the head. This and the blockwise log-sum-exp over vocabulary tiles follow
   Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language
   Models" (Cut Cross-Entropy, arXiv:2411.09009).
2. For each row block, logits are computed one vocabulary tile at a time with
   an online max / log-sum-exp (Milakov & Gimelshein 2018, "Online
   normalizer calculation for softmax", arXiv:1805.02867), together with the
   target logit and, on request, a running argmax. The full (M, V) logits
   are never stored.
3. Gradients use d(loss_row)/d(logits) = softmax * (1 + 2 z lse) - onehot,
   where z is the PaLM z-loss coefficient (Chowdhery et al. 2022): each
   target row adds ``z * lse**2``. Then dH = dlogits @ W and
   dW = dlogits^T @ H.

Paths:

* Triton (CUDA tensors, or ``TRITON_INTERPRET=1``): the forward kernel
  stores lse, the target logit and the argmax per row; the backward kernel
  recomputes each (row block, vocab tile) of logits and atomically adds its
  share of dH and dW into fp32 buffers. Extra memory: O(M + M*H + V*H).
* torch (CPU): rows in chunks of ``chunk_size``; each chunk's fp32 logits
  live in one reused (chunk, V) buffer that is turned into dlogits in place.
  When gradients are needed they are computed during the forward (one head
  matmul fewer than recomputing in backward; on CPU this is what makes the
  CLM phase faster than the naive formulation) and the backward only scales
  them by the incoming gradient. Extra memory: O(chunk*V + M*H + V*H).

Letters: B batch, T sequence, H hidden size, V vocabulary size, N = B*T rows,
M target rows.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import backend as _backend

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # Triton is optional: the torch path needs only torch.
    triton = None
    tl = None
    _HAS_TRITON = False

# Read once, as Triton does: the variable must be set before this module is imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

IGNORE_INDEX = -100
"""Label value of a position without a loss. This module owns it: collators write it,
the models, the evaluator and the kernels read it from here."""

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Default torch-path chunk: about 2**23 fp32 logits (32 MiB) per chunk. On CPU the three head
# matmuls dominate; larger chunks mean fewer read-modify-writes of the (V, H) weight gradient,
# and 256 to 1024 rows at V = 16,000 timed within a few percent of each other.
_TORCH_CHUNK_ELEMENTS = 1 << 23


# ---------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------

if _HAS_TRITON:

    def _fwd_configs():
        if _INTERPRET:  # autotune with 2+ configs fails under the interpreter
            return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
        return [
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        ]

    def _bwd_configs():
        if _INTERPRET:
            return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
        return [
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 32}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        ]

    @triton.jit
    def _logits_tile(
        h_ptr, w_ptr, offs_m, offs_n, mask_m, mask_n, H,
        stride_hm, stride_hk, stride_wv, stride_wk,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """(BLOCK_M, BLOCK_N) fp32 tile of h @ w.T, accumulated over H in BLOCK_K steps."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < H
            a = tl.load(
                h_ptr + offs_m[:, None] * stride_hm + offs_k[None, :] * stride_hk,
                mask=mask_m[:, None] & mask_k[None, :], other=0.0,
            )
            b = tl.load(
                w_ptr + offs_n[None, :] * stride_wv + offs_k[:, None] * stride_wk,
                mask=mask_n[None, :] & mask_k[:, None], other=0.0,
            )
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        return acc

    @triton.autotune(configs=_fwd_configs(), key=["V", "H"])
    @triton.jit
    def _masked_token_loss_fwd_kernel(
        h_ptr, w_ptr, y_ptr, lse_ptr, tgt_ptr, argmax_ptr,
        M, V, H,
        stride_hm, stride_hk, stride_wv, stride_wk,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        RETURN_ARGMAX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """One program per BLOCK_M target rows; loops over all vocabulary tiles."""
        pid_m = tl.program_id(0).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        y = tl.load(y_ptr + offs_m, mask=mask_m, other=-1)

        run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        tgt = tl.zeros((BLOCK_M,), dtype=tl.float32)
        best_val = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        best_idx = tl.zeros((BLOCK_M,), dtype=tl.int64)
        for n0 in range(0, V, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            mask_n = offs_n < V
            logits = _logits_tile(
                h_ptr, w_ptr, offs_m, offs_n, mask_m, mask_n, H,
                stride_hm, stride_hk, stride_wv, stride_wk,
                BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION,
            )
            logits = tl.where(mask_n[None, :], logits, float("-inf"))
            tile_max = tl.max(logits, axis=1)
            new_max = tl.maximum(run_max, tile_max)
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
            run_max = new_max
            tgt += tl.sum(tl.where(offs_n[None, :] == y[:, None], logits, 0.0), axis=1)
            if RETURN_ARGMAX:
                tile_idx = tl.argmax(logits, axis=1).to(tl.int64) + n0
                better = tile_max > best_val  # strict: the first maximum wins, as in torch.argmax
                best_idx = tl.where(better, tile_idx, best_idx)
                best_val = tl.where(better, tile_max, best_val)

        tl.store(lse_ptr + offs_m, run_max + tl.log(run_sum), mask=mask_m)
        tl.store(tgt_ptr + offs_m, tgt, mask=mask_m)
        if RETURN_ARGMAX:
            tl.store(argmax_ptr + offs_m, best_idx, mask=mask_m)

    @triton.autotune(configs=_bwd_configs(), key=["V", "H"], reset_to_zero=["dh_ptr", "dw_ptr"])
    @triton.jit
    def _masked_token_loss_bwd_kernel(
        h_ptr, w_ptr, y_ptr, lse_ptr, grad_ptr, dh_ptr, dw_ptr,
        z_loss, M, V, H,
        stride_hm, stride_hk, stride_wv, stride_wk, stride_dhm, stride_dwv,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """One program per (row block, vocab tile): recompute logits, add its dH and dW shares."""
        pid_m = tl.program_id(0).to(tl.int64)
        pid_n = tl.program_id(1).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < V

        logits = _logits_tile(
            h_ptr, w_ptr, offs_m, offs_n, mask_m, mask_n, H,
            stride_hm, stride_hk, stride_wv, stride_wk,
            BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION,
        )
        y = tl.load(y_ptr + offs_m, mask=mask_m, other=-1)
        lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
        grad = tl.load(grad_ptr)  # fp32: incoming gradient times the reduction scale
        probs = tl.exp(logits - lse[:, None])
        dlogits = probs * (1.0 + 2.0 * z_loss * lse)[:, None] - tl.where(offs_n[None, :] == y[:, None], 1.0, 0.0)
        dlogits = tl.where(mask_m[:, None] & mask_n[None, :], dlogits * grad, 0.0)
        dlogits = dlogits.to(h_ptr.dtype.element_ty)

        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < H
            if COMPUTE_DH:
                w_tile = tl.load(
                    w_ptr + offs_n[:, None] * stride_wv + offs_k[None, :] * stride_wk,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0,
                )
                dh = tl.dot(dlogits, w_tile, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_K)
                tl.atomic_add(
                    dh_ptr + offs_m[:, None] * stride_dhm + offs_k[None, :], dh,
                    mask=mask_m[:, None] & mask_k[None, :], sem="relaxed",
                )
            if COMPUTE_DW:
                h_tile = tl.load(
                    h_ptr + offs_m[:, None] * stride_hm + offs_k[None, :] * stride_hk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0,
                )
                dw = tl.dot(tl.trans(dlogits), h_tile, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_K)
                tl.atomic_add(
                    dw_ptr + offs_n[:, None] * stride_dwv + offs_k[None, :], dw,
                    mask=mask_n[:, None] & mask_k[None, :], sem="relaxed",
                )


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------


def _check_kernel_inputs(h, weight, targets):
    if not _HAS_TRITON:
        raise RuntimeError("masked_token_loss: the Triton backend needs the `triton` package")
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"expected h (M, H) and weight (V, H), got {tuple(h.shape)} and {tuple(weight.shape)}")
    if h.dtype != weight.dtype or h.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"h and weight must share one dtype of {_SUPPORTED_DTYPES}, got {h.dtype}, {weight.dtype}")
    if targets.shape != (h.shape[0],) or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 of shape ({h.shape[0]},), got {targets.dtype} {tuple(targets.shape)}")
    if not (h.is_cuda or _INTERPRET):
        raise RuntimeError("masked_token_loss: the Triton backend needs CUDA tensors or TRITON_INTERPRET=1")
    h = h if h.stride(-1) == 1 else h.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    # fp32 inputs: exact fp32 products (no TF32), so fp32 means fp32; 16-bit inputs use the default.
    dot_precision = "ieee" if h.dtype == torch.float32 else None
    return h, weight, targets.contiguous(), dot_precision


def masked_token_loss_forward(h, weight, targets, *, return_argmax=False):
    """Triton forward over target rows.

    Args:
        h: (M, H) fp16/bf16/fp32, the compacted target rows.
        weight: (V, H), same dtype as ``h``.
        targets: (M,) int64, each in [0, V).
        return_argmax: also return the argmax over V of each row's logits.

    Returns:
        ``(lse, target_logit, argmax)``: (M,) fp32 log-sum-exp of the logits in
        nats, (M,) fp32 logit of the target, and (M,) int64 argmax (None unless
        requested).

    Raises:
        ValueError on shape or dtype errors; RuntimeError without Triton, or
        on CPU tensors when the interpreter is off.
    """
    h, weight, targets, dot_precision = _check_kernel_inputs(h, weight, targets)
    M, H = h.shape
    V = weight.shape[0]
    lse = torch.empty(M, dtype=torch.float32, device=h.device)
    tgt = torch.empty(M, dtype=torch.float32, device=h.device)
    argmax = torch.empty(M, dtype=torch.int64, device=h.device) if return_argmax else None
    if M == 0:
        return lse, tgt, argmax

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]),)

    _masked_token_loss_fwd_kernel[grid](
        h, weight, targets, lse, tgt, argmax if return_argmax else lse,
        M, V, H,
        h.stride(0), h.stride(1), weight.stride(0), weight.stride(1),
        RETURN_ARGMAX=return_argmax, DOT_PRECISION=dot_precision,
    )
    return lse, tgt, argmax


def masked_token_loss_backward(h, weight, targets, lse, grad, *, z_loss=0.0, compute_dh=True, compute_dw=True):
    """Triton backward over target rows.

    Args:
        h, weight, targets: as in :func:`masked_token_loss_forward`.
        lse: (M,) fp32 from the forward.
        grad: (1,) fp32 tensor, d(loss)/d(sum of row losses), i.e. the incoming
            gradient times the reduction scale (1 or 1/M). A tensor, not a float,
            so no host synchronisation is needed.
        z_loss: z-loss coefficient used in the forward.

    Returns:
        ``(dh, dw)``: (M, H) and (V, H) fp32 gradients, or None where not requested.
    """
    h, weight, targets, dot_precision = _check_kernel_inputs(h, weight, targets)
    M, H = h.shape
    V = weight.shape[0]
    dh = torch.zeros(M, H, dtype=torch.float32, device=h.device) if compute_dh else None
    dw = torch.zeros(V, H, dtype=torch.float32, device=h.device) if compute_dw else None
    if M == 0 or not (compute_dh or compute_dw):
        return dh, dw
    grad = grad.reshape(1).to(device=h.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(V, meta["BLOCK_N"]))

    dummy = dh if dh is not None else dw
    _masked_token_loss_bwd_kernel[grid](
        h, weight, targets, lse, grad,
        dh if compute_dh else dummy, dw if compute_dw else dummy,
        float(z_loss), M, V, H,
        h.stride(0), h.stride(1), weight.stride(0), weight.stride(1), H, H,
        COMPUTE_DH=compute_dh, COMPUTE_DW=compute_dw, DOT_PRECISION=dot_precision,
    )
    return dh, dw


def default_chunk_rows(vocab_size):
    """Torch-path rows per chunk: a power of two giving about 2**23 fp32 logits (32 MiB), in [16, 4096]."""
    rows = _TORCH_CHUNK_ELEMENTS / max(int(vocab_size), 1)
    return int(min(4096, max(16, 2 ** round(math.log2(max(rows, 1.0))))))


def _torch_chunked_forward(h, weight, targets, *, z_loss, chunk_size, return_argmax, compute_dh, compute_dw):
    """Torch path over target rows; see the module docstring.

    h: (M, H), weight: (V, H), any float dtype; targets: (M,) int64.
    Returns ``(lse, target_logit, argmax, dh, dw)``: (M,) fp32, (M,) fp32,
    (M,) int64 or None, and fp32 gradients of the summed row loss,
    (M, H) and (V, H), or None where not requested.
    """
    M, H = h.shape
    V = weight.shape[0]
    device = h.device
    w32 = weight.float()  # no copy for fp32
    lse = torch.empty(M, dtype=torch.float32, device=device)
    tgt = torch.empty(M, dtype=torch.float32, device=device)
    argmax = torch.empty(M, dtype=torch.int64, device=device) if return_argmax else None
    dh = torch.empty(M, H, dtype=torch.float32, device=device) if compute_dh else None
    dw = torch.zeros(V, H, dtype=torch.float32, device=device) if compute_dw else None
    if M == 0:
        return lse, tgt, argmax, dh, dw

    chunk = min(int(chunk_size) if chunk_size else default_chunk_rows(V), M)
    logits_buf = torch.empty(chunk, V, dtype=torch.float32, device=device)  # the only O(chunk x V) tensor
    for start in range(0, M, chunk):
        end = min(start + chunk, M)
        rows = end - start
        h_c = h[start:end].float()  # (rows, H)
        y_c = targets[start:end]
        logits = torch.mm(h_c, w32.t(), out=logits_buf[:rows])  # (rows, V) fp32
        tgt[start:end] = logits.gather(1, y_c[:, None]).squeeze(1)
        if return_argmax:
            argmax[start:end] = logits.argmax(dim=1)
        row_max = logits.amax(dim=1, keepdim=True)
        probs = logits.sub_(row_max).exp_()  # unnormalised softmax, in place
        sum_exp = probs.sum(dim=1, keepdim=True)
        lse_c = row_max + sum_exp.log()  # (rows, 1)
        lse[start:end] = lse_c.squeeze(1)
        if not (compute_dh or compute_dw):
            continue
        # dlogits = softmax * (1 + 2 z lse) - onehot, in place in the same buffer
        dlogits = probs.mul_((1.0 + 2.0 * z_loss * lse_c) / sum_exp)
        dlogits[torch.arange(rows, device=device), y_c] -= 1.0
        if compute_dh:
            torch.mm(dlogits, w32, out=dh[start:end])
        if compute_dw:
            dw.addmm_(dlogits.t(), h_c)
    return lse, tgt, argmax, dh, dw


# ---------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------


class MaskedTokenLossFunction(torch.autograd.Function):
    """Loss over already-compacted target rows.

    forward(h (M, H), weight (V, H), targets (M,) int64, z_loss, scale, use_triton,
    chunk_size, return_accuracy, want_grads) -> (loss fp32 scalar = scale * sum of
    row losses in nats, n_correct int64 scalar, 0 unless return_accuracy).
    Gradients come back in the dtypes of ``h`` and ``weight``.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, z_loss, scale, use_triton, chunk_size, return_accuracy, want_grads):
        compute_dh = bool(want_grads and ctx.needs_input_grad[0])
        compute_dw = bool(want_grads and ctx.needs_input_grad[1])
        ctx.use_triton = use_triton
        ctx.z_loss = z_loss
        ctx.scale = scale
        ctx.dtypes = (h.dtype, weight.dtype)
        ctx.compute = (compute_dh, compute_dw)
        if use_triton:
            lse, tgt, argmax = masked_token_loss_forward(h, weight, targets, return_argmax=return_accuracy)
            ctx.save_for_backward(h, weight, targets, lse)
        else:
            lse, tgt, argmax, dh, dw = _torch_chunked_forward(
                h, weight, targets, z_loss=z_loss, chunk_size=chunk_size, return_argmax=return_accuracy,
                compute_dh=compute_dh, compute_dw=compute_dw,
            )
            ctx.save_for_backward(dh, dw)
        row_loss = lse - tgt
        if z_loss:
            row_loss = row_loss + z_loss * lse.square()
        loss = row_loss.sum() * scale
        if return_accuracy:
            n_correct = (argmax == targets).sum()
        else:
            n_correct = torch.zeros((), dtype=torch.int64, device=h.device)
        ctx.mark_non_differentiable(n_correct)
        return loss, n_correct

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_n_correct):
        compute_dh, compute_dw = ctx.compute
        grad = grad_loss.float() * ctx.scale  # 0-d fp32 tensor
        if ctx.use_triton:
            h, weight, targets, lse = ctx.saved_tensors
            dh, dw = masked_token_loss_backward(
                h, weight, targets, lse, grad, z_loss=ctx.z_loss, compute_dh=compute_dh, compute_dw=compute_dw
            )
        else:
            dh, dw = ctx.saved_tensors
            # out of place, so that backward with retain_graph=True may run again
            dh = dh * grad if dh is not None else None
            dw = dw * grad if dw is not None else None
        h_dtype, w_dtype = ctx.dtypes
        dh = dh.to(h_dtype) if dh is not None else None
        dw = dw.to(w_dtype) if dw is not None else None
        return dh, dw, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def _check_inputs(hidden, weight, labels, ignore_index, reduction, z_loss, backend, chunk_size):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be a (B, T, H) or (N, H) tensor, got shape {tuple(getattr(hidden, 'shape', ()))}")
    if hidden.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"hidden must be float16, bfloat16 or float32, got {hidden.dtype}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a (V, H) tensor, got shape {tuple(getattr(weight, 'shape', ()))}")
    if weight.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"weight must be float16, bfloat16 or float32, got {weight.dtype}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (V, H={hidden.shape[-1]}) to match hidden, got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (vocabulary size V >= 1)")
    if not isinstance(labels, torch.Tensor) or labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels must have shape {tuple(hidden.shape[:-1])} (hidden without its last dim), "
            f"got {tuple(getattr(labels, 'shape', ()))}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if hidden.device != weight.device or hidden.device != labels.device:
        raise ValueError(
            f"hidden, weight and labels must be on one device, got {hidden.device}, {weight.device}, {labels.device}"
        )
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if not (isinstance(z_loss, (int, float)) and math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"z_loss must be a finite float >= 0, got {z_loss!r}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    vocab = weight.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        raise ValueError(
            f"labels must be in [0, {vocab}) (the vocabulary size is weight.shape[0]) or equal "
            f"ignore_index={ignore_index}; found {int(labels[bad][0])}"
        )


def _use_triton(backend, device):
    """Run the Triton path for ``backend`` on ``device`` (see :func:`antlm_dist.kernels.backend.use_triton`)."""
    return _backend.use_triton(backend, device, "masked_token_loss", built_for_interpreter=_INTERPRET)


def masked_token_loss(
    hidden,
    weight,
    labels,
    *,
    ignore_index=IGNORE_INDEX,
    reduction="sum",
    z_loss=0.0,
    return_accuracy=False,
    backend="auto",
    chunk_size=None,
):
    """Cross-entropy of the LM head ``hidden @ weight.T`` on target positions only.

    Never materialises the (rows, V) logits: target rows are gathered first,
    then processed in chunks / vocabulary tiles (Cut Cross-Entropy, Wijmans et
    al. 2024; online softmax, Milakov & Gimelshein 2018). See the module
    docstring for the algorithm and memory bounds.

    Args:
        hidden: (B, T, H) or (N, H), float16 / bfloat16 / float32.
        weight: (V, H) LM head (or tied embedding), float16 / bfloat16 / float32.
        labels: (B, T) or (N,), integer. ``labels[b, t]`` is the token the
            hidden state at (b, t) must predict; ``ignore_index`` marks no loss.
        ignore_index: label value without a loss (default -100).
        reduction: "sum" (default; the trainer divides by the target count of
            the whole global batch) or "mean" over this call's targets (0 when
            there are none).
        z_loss: coefficient of the PaLM z-loss; each target row adds
            ``z_loss * logsumexp(logits)**2``, included in ``loss``.
        return_accuracy: also return the number of target rows whose argmax
            over V equals the label.
        backend: "auto" (Triton where it can run: CUDA tensors, or any tensors when
            TRITON_INTERPRET=1 was set before import; torch otherwise), "triton" or
            "torch". Models pass the backend resolved once by
            :func:`antlm_dist.kernels.backend.resolve_backends`.
        chunk_size: rows per chunk of the torch path (default: about 2**23
            logits per chunk, see :func:`default_chunk_rows`); the Triton path
            ignores it and tiles with its autotuned block sizes.

    Returns:
        ``(loss, n_targets)`` or ``(loss, n_targets, n_correct)``: loss a 0-d
        float32 tensor in nats (cross-entropy plus z-loss, summed or averaged),
        n_targets and n_correct 0-d int64 tensors on the input device.
        Gradients flow to ``hidden`` and ``weight`` in their own dtypes;
        logits, softmax and gradient accumulation are fp32.

    Raises:
        ValueError: a shape, dtype, device or argument error (the message names
            the argument), or a label outside [0, V) that is not
            ``ignore_index``; raised before any compute.
        RuntimeError: ``backend="triton"`` where Triton cannot run (no triton, or CPU
            tensors without TRITON_INTERPRET=1).
    """
    _check_inputs(hidden, weight, labels, ignore_index, reduction, z_loss, backend, chunk_size)
    vocab, dim = weight.shape
    run_triton = _use_triton(backend, hidden.device)

    flat_hidden = hidden.reshape(-1, dim)  # (N, H)
    flat_labels = labels.reshape(-1)  # (N,)
    is_target = flat_labels != ignore_index
    n_targets = is_target.sum()  # 0-d int64
    target_idx = is_target.nonzero().squeeze(1)  # (M,)
    n_rows = target_idx.numel()
    if n_rows == flat_labels.numel():  # CLM: every row is a target, no gather copy
        rows, targets = flat_hidden, flat_labels.long()
    else:
        rows = flat_hidden.index_select(0, target_idx)  # (M, H); autograd scatters dH back
        targets = flat_labels.index_select(0, target_idx).long()

    w = weight
    if run_triton and rows.dtype != w.dtype:  # the kernel's tl.dot needs one dtype
        common = torch.promote_types(rows.dtype, w.dtype)
        rows, w = rows.to(common), w.to(common)

    scale = 1.0 / max(n_rows, 1) if reduction == "mean" else 1.0
    loss, n_correct = MaskedTokenLossFunction.apply(
        rows, w, targets, float(z_loss), scale, run_triton, chunk_size, bool(return_accuracy),
        torch.is_grad_enabled(),
    )
    if return_accuracy:
        return loss, n_targets, n_correct
    return loss, n_targets


def masked_token_loss_ref(
    hidden, weight, labels, *, ignore_index=IGNORE_INDEX, reduction="sum", z_loss=0.0, return_accuracy=False
):
    """Naive reference: full logits ``hidden @ weight.T`` (N, V), then ``F.cross_entropy``.

    Same arguments, returns and label check as :func:`masked_token_loss`
    (no backend / chunk_size). The matmul runs in the input dtype, the loss in
    fp32. Memory O(N x V): a readable specification and the benchmark baseline.
    """
    _check_inputs(hidden, weight, labels, ignore_index, reduction, z_loss, "torch", None)
    vocab, dim = weight.shape
    flat_labels = labels.reshape(-1).long()
    is_target = flat_labels != ignore_index
    logits = (hidden.reshape(-1, dim) @ weight.t()).float()  # (N, V)
    loss = F.cross_entropy(logits, flat_labels, ignore_index=ignore_index, reduction="sum")
    if z_loss:
        lse = torch.logsumexp(logits, dim=1)
        loss = loss + z_loss * torch.where(is_target, lse.square(), 0.0).sum()
    n_targets = is_target.sum()
    if reduction == "mean":
        loss = loss / n_targets.clamp(min=1)
    if return_accuracy:
        n_correct = ((logits.argmax(dim=1) == flat_labels) & is_target).sum()
        return loss, n_targets, n_correct
    return loss, n_targets
