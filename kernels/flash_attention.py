"""Flash attention in Triton for AntLM's two phases: causal (CLM) and bidirectional (MLM).

The algorithm is FlashAttention-2 (Tri Dao, "FlashAttention-2: Faster Attention with
Better Parallelism and Work Partitioning", 2023): the forward pass streams key/value
blocks through an online softmax and saves the log-sum-exp per query row; the backward
pass recomputes the probabilities from it, with a preprocessing kernel for
delta = rowsum(dO * O), one kernel for dK/dV (one key block per program, looping over
query blocks and over the query heads of a grouped-query group) and one for dQ (one
query block per program, looping over key blocks). No atomics are used.

Mode switches are ``tl.constexpr`` flags, so every combination compiles its own
variant and pays only for what it uses:

* ``IS_CAUSAL``: key blocks above the diagonal are skipped, and only the blocks on the
  diagonal apply the triangle mask.
* ``HAS_PADDING`` / ``HAS_SEGMENTS``: key padding and packed-document masks.
* ``EVEN``: the sequence length is a multiple of every block size of every config, so
  no load needs a boundary mask (set in the launcher, not by a heuristic).

Layout (SDPA's): q (B, H, T, D), k and v (B, Hkv, T, D) with H % Hkv == 0.
Semantics follow ``antlm_dist.model.attention.attention``: output rows of padded query
positions (``key_padding_mask`` False) are exact zeros, and a query row with no
allowed key gives zeros, never NaN. Padded query rows also contribute nothing to any
gradient.

The module is laid out as the other kernels are: jit kernels, then launchers
(:func:`flash_attention_forward`, :func:`flash_attention_backward`), then
:class:`FlashAttentionFunction`, then the public :func:`flash_attention` and the torch
reference :func:`flash_attention_ref`.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .backend import FLASH_ATTENTION_HEAD_DIMS, use_triton

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - platforms without triton use the torch path

    class _NoTriton:
        """Stand-in so the kernel definitions below still evaluate without triton."""

        constexpr = None
        float32 = int64 = None

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def autotune(**_):
            return lambda f: f

        @staticmethod
        def Config(*args, **kwargs):  # noqa: N802 - mirrors triton.Config
            return None

    triton = tl = _NoTriton()
    HAS_TRITON = False

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = FLASH_ATTENTION_HEAD_DIMS  # declared beside the backend resolver, which checks it at preflight
BACKENDS = ("auto", "triton", "torch")
NAN_FILL_BUFFERS = False
"""Fill every kernel output buffer with NaN before launch. Tests set it (monkeypatch), so an
element a kernel forgets to write fails the comparison; read per allocation, never from the
environment."""

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


# Whether the @triton.jit decorators below built interpreter functions: the variable
# must be set before this module is imported for CPU tensors to run through Triton.
BUILT_FOR_INTERPRETER = HAS_TRITON and _interpreting()


def _configs(blocks, interpreted_blocks, block_names):
    """Autotune configs: several on a GPU, exactly one under the interpreter
    (autotune with two or more configs fails there, and small blocks keep it fast)."""
    if BUILT_FOR_INTERPRETER:
        return [triton.Config(dict(zip(block_names, interpreted_blocks)), num_warps=4, num_stages=1)]
    return [
        triton.Config(dict(zip(block_names, (bm, bn))), num_warps=warps, num_stages=stages)
        for bm, bn, warps, stages in blocks
    ]


# (BLOCK_M, BLOCK_N, num_warps, num_stages). Forward and dQ need BLOCK_M % BLOCK_N == 0
# (the causal diagonal starts on a key-block edge); dK/dV needs BLOCK_N % BLOCK_M == 0.
_FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)], (32, 16), ("BLOCK_M", "BLOCK_N"))
_DKDV_CONFIGS = _configs([(32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3)], (16, 32), ("BLOCK_M", "BLOCK_N"))
_DQ_CONFIGS = _configs([(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)], (32, 16), ("BLOCK_M", "BLOCK_N"))
_PRE_BLOCK_M = 32 if BUILT_FOR_INTERPRETER else 128
# EVEN means T is a multiple of every block size in use; blocks are powers of two, so
# checking the largest one suffices.
_MAX_BLOCK = 32 if BUILT_FOR_INTERPRETER else 128
_AUTOTUNE_KEY = ["SEQ_BUCKET", "HEAD_DIM", "IS_CAUSAL"]


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _mask_scores(
    s, offs_m, offs_n, col_ok, seg_q, kpm_base, seg_base,
    DIAG: tl.constexpr, BOUNDARY: tl.constexpr, HAS_PADDING: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
):
    """Scores s (BLOCK_M, BLOCK_N) with -inf where query row offs_m may not see key offs_n:
    past the end (BOUNDARY), above the diagonal (DIAG), a padded key, another segment.
    The forward and the dQ pass share it, so both apply the same mask."""
    if BOUNDARY:
        s = tl.where(col_ok[None, :], s, float("-inf"))
    if DIAG:
        s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
    if HAS_PADDING:
        key_real = tl.load(kpm_base + offs_n, mask=col_ok, other=0)
        s = tl.where(key_real[None, :] != 0, s, float("-inf"))
    if HAS_SEGMENTS:
        seg_k = tl.load(seg_base + offs_n, mask=col_ok, other=0)
        s = tl.where(seg_q[:, None] == seg_k[None, :], s, float("-inf"))
    return s


@triton.jit
def _load_query_rows(
    q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, row_ok, MASKED: tl.constexpr,
):
    """q, dO (BLOCK_M, D) and lse, delta (BLOCK_M,) fp32 of one query block for the backward.
    With MASKED, rows past the end read q = dO = 0, delta = 0 and lse = +inf, hence p = 0."""
    if MASKED:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_ptrs, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_ptrs, mask=row_ok, other=0.0)
    else:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
        lse = tl.load(lse_ptrs)
        delta = tl.load(delta_ptrs)
    return q, do, lse, delta


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q, seg_q, offs_m,
    k_base, v_base, kpm_base, seg_base,
    stride_kt, stride_vt, lo, hi, seq_len, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    DIAG: tl.constexpr, BOUNDARY: tl.constexpr,
    HAS_PADDING: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Stream key blocks [lo, hi) through the online softmax of one query block.
    Scores are kept in the log2 domain (qk_scale includes log2(e))."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < seq_len
        kt_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None]  # (D, BLOCK_N)
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]  # (BLOCK_N, D)
        if BOUNDARY:
            kt = tl.load(kt_ptrs, mask=col_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N) fp32
        s = _mask_scores(s, offs_m, offs_n, col_ok, seg_q, kpm_base, seg_base,
                         DIAG, BOUNDARY, HAS_PADDING, HAS_SEGMENTS)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no allowed key so far keeps m = -inf; shift by 0 there so that
        # exp2(-inf - -inf) never produces NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=_AUTOTUNE_KEY)
@triton.jit
def _flash_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, kpm_ptr, seg_ptr,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_pb, stride_sb,
    num_heads, seq_len, softmax_scale, SEQ_BUCKET,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN: tl.constexpr,
    HAS_PADDING: tl.constexpr, HAS_SEGMENTS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (query block, batch * head): o (B, H, T, D), lse (B, H, T) fp32."""
    start_m = tl.program_id(0).to(tl.int64)
    off_bh = tl.program_id(1).to(tl.int64)
    off_b = off_bh // num_heads
    off_h = off_bh % num_heads
    off_hkv = off_h // GROUPS
    q_base = q_ptr + off_b * stride_qb + off_h * stride_qh
    k_base = k_ptr + off_b * stride_kb + off_hkv * stride_kh
    v_base = v_ptr + off_b * stride_vb + off_hkv * stride_vh
    o_base = o_ptr + off_b * stride_ob + off_h * stride_oh
    kpm_base = kpm_ptr + off_b * stride_pb
    seg_base = seg_ptr + off_b * stride_sb

    block_lo = (start_m * BLOCK_M).to(tl.int32)
    offs_m = block_lo + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len
    q_ptrs = q_base + offs_m[:, None] * stride_qt + offs_d[None, :]
    if EVEN:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    seg_q = offs_m
    if HAS_SEGMENTS:
        seg_q = tl.load(seg_base + offs_m, mask=row_ok, other=0)
    qk_scale = softmax_scale * 1.4426950408889634  # log2(e): the softmax runs on exp2

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if IS_CAUSAL:
        # Key blocks left of the diagonal need no triangle mask, blocks right of it are
        # never visited, and only the diagonal block masks.
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, seg_q, offs_m, k_base, v_base, kpm_base, seg_base,
            stride_kt, stride_vt, 0, block_lo, seq_len, qk_scale,
            BLOCK_N, HEAD_DIM, False, False, HAS_PADDING, HAS_SEGMENTS, INPUT_PRECISION,
        )
        diag_hi = tl.minimum(block_lo + BLOCK_M, seq_len)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, seg_q, offs_m, k_base, v_base, kpm_base, seg_base,
            stride_kt, stride_vt, block_lo, diag_hi, seq_len, qk_scale,
            BLOCK_N, HEAD_DIM, True, not EVEN, HAS_PADDING, HAS_SEGMENTS, INPUT_PRECISION,
        )
    else:
        full_hi = (seq_len // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, seg_q, offs_m, k_base, v_base, kpm_base, seg_base,
            stride_kt, stride_vt, 0, full_hi, seq_len, qk_scale,
            BLOCK_N, HEAD_DIM, False, False, HAS_PADDING, HAS_SEGMENTS, INPUT_PRECISION,
        )
        if not EVEN:
            acc, l_i, m_i = _attn_fwd_inner(
                acc, l_i, m_i, q, seg_q, offs_m, k_base, v_base, kpm_base, seg_base,
                stride_kt, stride_vt, full_hi, seq_len, seq_len, qk_scale,
                BLOCK_N, HEAD_DIM, False, True, HAS_PADDING, HAS_SEGMENTS, INPUT_PRECISION,
            )

    row_live = l_i > 0.0
    if HAS_PADDING:
        query_real = tl.load(kpm_base + offs_m, mask=row_ok, other=0)
        row_live = row_live & (query_real != 0)
    l_safe = tl.where(row_live, l_i, 1.0)
    out = tl.where(row_live[:, None], acc / l_safe[:, None], 0.0)
    # Dead rows (padded queries, rows with no allowed key) store lse = +inf, so the
    # backward recomputes p = exp(s - lse) = 0 for them and they add no gradient.
    lse = tl.where(row_live, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("inf"))
    o_ptrs = o_base + offs_m[:, None] * stride_ot + offs_d[None, :]
    lse_ptrs = lse_ptr + off_bh * seq_len + offs_m
    if EVEN:
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty))
        tl.store(lse_ptrs, lse)
    else:
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.store(lse_ptrs, lse, mask=row_ok)


@triton.jit
def _flash_attn_bwd_preprocess_kernel(
    o_ptr, do_ptr, delta_ptr,
    stride_ob, stride_oh, stride_ot,
    stride_dob, stride_doh, stride_dot,
    num_heads, seq_len,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta (B, H, T) fp32 = rowsum(dO * O)."""
    start_m = tl.program_id(0).to(tl.int64)
    off_bh = tl.program_id(1).to(tl.int64)
    off_b = off_bh // num_heads
    off_h = off_bh % num_heads
    offs_m = (start_m * BLOCK_M).to(tl.int32) + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len
    o = tl.load(
        o_ptr + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
        mask=row_ok[:, None], other=0.0,
    )
    do = tl.load(
        do_ptr + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
        mask=row_ok[:, None], other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + off_bh * seq_len + offs_m, delta, mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v, offs_n, key_real, seg_k,
    q_base, do_base, lse_base, delta_base, seg_base,
    stride_qt, stride_dot, lo, hi, seq_len, qk_scale,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    DIAG: tl.constexpr, BOUNDARY: tl.constexpr,
    HAS_PADDING: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Accumulate one key block's dK, dV over query blocks [lo, hi) of one head.
    Works on transposed scores (BLOCK_N, BLOCK_M) so no accumulator is transposed."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seq_len
        q_ptrs = q_base + offs_m[:, None] * stride_qt + offs_d[None, :]
        do_ptrs = do_base + offs_m[:, None] * stride_dot + offs_d[None, :]
        q, do, lse, delta = _load_query_rows(q_ptrs, do_ptrs, lse_base + offs_m, delta_base + offs_m, row_ok, BOUNDARY)
        st = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        if DIAG:
            st = tl.where(offs_m[None, :] >= offs_n[:, None], st, float("-inf"))
        if HAS_PADDING:
            st = tl.where(key_real[:, None], st, float("-inf"))
        if HAS_SEGMENTS:
            seg_q = tl.load(seg_base + offs_m, mask=row_ok, other=0)
            st = tl.where(seg_q[None, :] == seg_k[:, None], st, float("-inf"))
        pt = tl.math.exp2(st - lse[None, :] * 1.4426950408889634)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=INPUT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_M)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=_AUTOTUNE_KEY)
@triton.jit
def _flash_attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, kpm_ptr, seg_ptr,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    stride_pb, stride_sb,
    num_heads, num_kv_heads, seq_len, softmax_scale, SEQ_BUCKET,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN: tl.constexpr,
    HAS_PADDING: tl.constexpr, HAS_SEGMENTS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (key block, batch * kv head): dK, dV (B, Hkv, T, D), summed over
    the GROUPS query heads that share the kv head."""
    start_n = tl.program_id(0).to(tl.int64)
    off_bkv = tl.program_id(1).to(tl.int64)
    off_b = off_bkv // num_kv_heads
    off_hkv = off_bkv % num_kv_heads
    block_lo = (start_n * BLOCK_N).to(tl.int32)
    offs_n = block_lo + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < seq_len
    k_ptrs = k_ptr + off_b * stride_kb + off_hkv * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = v_ptr + off_b * stride_vb + off_hkv * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
    if EVEN:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
    kpm_base = kpm_ptr + off_b * stride_pb
    seg_base = seg_ptr + off_b * stride_sb
    key_real = col_ok
    if HAS_PADDING:
        key_real = tl.load(kpm_base + offs_n, mask=col_ok, other=0) != 0
    seg_k = offs_n
    if HAS_SEGMENTS:
        seg_k = tl.load(seg_base + offs_n, mask=col_ok, other=0)
    qk_scale = softmax_scale * 1.4426950408889634

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    full_hi = (seq_len // BLOCK_M) * BLOCK_M
    for g in range(GROUPS):
        off_h = off_hkv * GROUPS + g
        off_bh = off_b * num_heads + off_h
        q_base = q_ptr + off_b * stride_qb + off_h * stride_qh
        do_base = do_ptr + off_b * stride_dob + off_h * stride_doh
        lse_base = lse_ptr + off_bh * seq_len
        delta_base = delta_ptr + off_bh * seq_len
        if IS_CAUSAL:
            # Query blocks above the diagonal see none of these keys: skipped. The
            # blocks on it mask the triangle; the ones below see every key.
            diag_hi = tl.minimum(block_lo + BLOCK_N, seq_len)
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, offs_n, key_real, seg_k, q_base, do_base, lse_base, delta_base, seg_base,
                stride_qt, stride_dot, block_lo, diag_hi, seq_len, qk_scale,
                BLOCK_M, HEAD_DIM, True, not EVEN, HAS_PADDING, HAS_SEGMENTS, INPUT_PRECISION,
            )
            below_lo = block_lo + BLOCK_N
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, offs_n, key_real, seg_k, q_base, do_base, lse_base, delta_base, seg_base,
                stride_qt, stride_dot, below_lo, full_hi, seq_len, qk_scale,
                BLOCK_M, HEAD_DIM, False, False, HAS_PADDING, HAS_SEGMENTS, INPUT_PRECISION,
            )
            if not EVEN:
                dk, dv = _attn_bwd_dkdv_inner(
                    dk, dv, k, v, offs_n, key_real, seg_k, q_base, do_base, lse_base, delta_base, seg_base,
                    stride_qt, stride_dot, tl.maximum(below_lo, full_hi), seq_len, seq_len, qk_scale,
                    BLOCK_M, HEAD_DIM, False, True, HAS_PADDING, HAS_SEGMENTS, INPUT_PRECISION,
                )
        else:
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, offs_n, key_real, seg_k, q_base, do_base, lse_base, delta_base, seg_base,
                stride_qt, stride_dot, 0, full_hi, seq_len, qk_scale,
                BLOCK_M, HEAD_DIM, False, False, HAS_PADDING, HAS_SEGMENTS, INPUT_PRECISION,
            )
            if not EVEN:
                dk, dv = _attn_bwd_dkdv_inner(
                    dk, dv, k, v, offs_n, key_real, seg_k, q_base, do_base, lse_base, delta_base, seg_base,
                    stride_qt, stride_dot, full_hi, seq_len, seq_len, qk_scale,
                    BLOCK_M, HEAD_DIM, False, True, HAS_PADDING, HAS_SEGMENTS, INPUT_PRECISION,
                )
    dk = dk * softmax_scale
    dk_ptrs = dk_ptr + off_b * stride_dkb + off_hkv * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :]
    dv_ptrs = dv_ptr + off_b * stride_dvb + off_hkv * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :]
    if EVEN:
        tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty))
        tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty))
    else:
        tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty), mask=col_ok[:, None])
        tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse2, delta, seg_q, offs_m,
    k_base, v_base, kpm_base, seg_base,
    stride_kt, stride_vt, lo, hi, seq_len, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    DIAG: tl.constexpr, BOUNDARY: tl.constexpr,
    HAS_PADDING: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Accumulate one query block's dQ over key blocks [lo, hi)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < seq_len
        kt_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None]  # (D, BLOCK_N)
        vt_ptrs = v_base + offs_n[None, :] * stride_vt + offs_d[:, None]  # (D, BLOCK_N)
        if BOUNDARY:
            kt = tl.load(kt_ptrs, mask=col_ok[None, :], other=0.0)
            vt = tl.load(vt_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            vt = tl.load(vt_ptrs)
        s = tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = _mask_scores(s, offs_m, offs_n, col_ok, seg_q, kpm_base, seg_base,
                         DIAG, BOUNDARY, HAS_PADDING, HAS_SEGMENTS)
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, vt, input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=INPUT_PRECISION)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=_AUTOTUNE_KEY)
@triton.jit
def _flash_attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, kpm_ptr, seg_ptr,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    stride_pb, stride_sb,
    num_heads, seq_len, softmax_scale, SEQ_BUCKET,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN: tl.constexpr,
    HAS_PADDING: tl.constexpr, HAS_SEGMENTS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (query block, batch * head): dQ (B, H, T, D)."""
    start_m = tl.program_id(0).to(tl.int64)
    off_bh = tl.program_id(1).to(tl.int64)
    off_b = off_bh // num_heads
    off_h = off_bh % num_heads
    off_hkv = off_h // GROUPS
    k_base = k_ptr + off_b * stride_kb + off_hkv * stride_kh
    v_base = v_ptr + off_b * stride_vb + off_hkv * stride_vh
    kpm_base = kpm_ptr + off_b * stride_pb
    seg_base = seg_ptr + off_b * stride_sb

    block_lo = (start_m * BLOCK_M).to(tl.int32)
    offs_m = block_lo + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len
    q_ptrs = q_ptr + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    do_ptrs = do_ptr + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :]
    lse_ptrs = lse_ptr + off_bh * seq_len + offs_m
    delta_ptrs = delta_ptr + off_bh * seq_len + offs_m
    q, do, lse, delta = _load_query_rows(q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, row_ok, not EVEN)
    lse2 = lse * 1.4426950408889634
    seg_q = offs_m
    if HAS_SEGMENTS:
        seg_q = tl.load(seg_base + offs_m, mask=row_ok, other=0)
    qk_scale = softmax_scale * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if IS_CAUSAL:
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, seg_q, offs_m, k_base, v_base, kpm_base, seg_base,
            stride_kt, stride_vt, 0, block_lo, seq_len, qk_scale,
            BLOCK_N, HEAD_DIM, False, False, HAS_PADDING, HAS_SEGMENTS, INPUT_PRECISION,
        )
        diag_hi = tl.minimum(block_lo + BLOCK_M, seq_len)
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, seg_q, offs_m, k_base, v_base, kpm_base, seg_base,
            stride_kt, stride_vt, block_lo, diag_hi, seq_len, qk_scale,
            BLOCK_N, HEAD_DIM, True, not EVEN, HAS_PADDING, HAS_SEGMENTS, INPUT_PRECISION,
        )
    else:
        full_hi = (seq_len // BLOCK_N) * BLOCK_N
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, seg_q, offs_m, k_base, v_base, kpm_base, seg_base,
            stride_kt, stride_vt, 0, full_hi, seq_len, qk_scale,
            BLOCK_N, HEAD_DIM, False, False, HAS_PADDING, HAS_SEGMENTS, INPUT_PRECISION,
        )
        if not EVEN:
            dq = _attn_bwd_dq_inner(
                dq, q, do, lse2, delta, seg_q, offs_m, k_base, v_base, kpm_base, seg_base,
                stride_kt, stride_vt, full_hi, seq_len, seq_len, qk_scale,
                BLOCK_N, HEAD_DIM, False, True, HAS_PADDING, HAS_SEGMENTS, INPUT_PRECISION,
            )
    dq = dq * softmax_scale
    dq_ptrs = dq_ptr + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :]
    if EVEN:
        tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty))
    else:
        tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


# --------------------------------------------------------------------------- launchers


def _check_inputs(q, k, v, key_padding_mask, segment_ids, *, dtypes=SUPPORTED_DTYPES, head_dims=SUPPORTED_HEAD_DIMS):
    """Validate shapes and dtypes; returns (B, H, Hkv, T, D)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"flash_attention: {name} must be a 4-d tensor (B, H, T, D); got {shape}")
        if dtypes is not None and t.dtype not in dtypes:
            raise ValueError(
                f"flash_attention: {name}.dtype={t.dtype} is not supported; use one of "
                f"{', '.join(str(d) for d in dtypes)}"
            )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"flash_attention: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"flash_attention: q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    batch, num_heads, seq_len, head_dim = q.shape
    if k.shape[0] != batch or k.shape[2] != seq_len or k.shape[3] != head_dim:
        raise ValueError(
            f"flash_attention: k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} "
            "in batch, sequence or head_dim"
        )
    num_kv_heads = k.shape[1]
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"flash_attention: q heads ({num_heads}) must be a multiple of k/v heads ({num_kv_heads})"
        )
    if head_dims is not None and head_dim not in head_dims:
        raise ValueError(
            f"flash_attention: head_dim={head_dim} is not supported; use one of {', '.join(map(str, head_dims))}"
        )
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (batch, seq_len):
            raise ValueError(
                f"flash_attention: key_padding_mask must have shape (B, T) = {(batch, seq_len)}; "
                f"got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.is_floating_point() or key_padding_mask.is_complex():
            raise ValueError(f"flash_attention: key_padding_mask must be bool or integer; got {key_padding_mask.dtype}")
    if segment_ids is not None:
        if tuple(segment_ids.shape) != (batch, seq_len):
            raise ValueError(
                f"flash_attention: segment_ids must have shape (B, T) = {(batch, seq_len)}; "
                f"got {tuple(segment_ids.shape)}"
            )
        if segment_ids.is_floating_point() or segment_ids.is_complex() or segment_ids.dtype == torch.bool:
            raise ValueError(f"flash_attention: segment_ids must be an integer tensor; got {segment_ids.dtype}")
    return batch, num_heads, num_kv_heads, seq_len, head_dim


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _prepare_masks(key_padding_mask, segment_ids, device):
    """(B, T) uint8 padding (1 = real) and (B, T) int32 segment ids, both contiguous."""
    kpm = None
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(device=device)
        kpm = (kpm if kpm.dtype == torch.bool else kpm != 0).contiguous().view(torch.uint8)
    seg = None
    if segment_ids is not None:
        seg = segment_ids.to(device=device, dtype=torch.int32).contiguous()
    return kpm, seg


def _new_buffer(shape, dtype, device) -> torch.Tensor:
    if NAN_FILL_BUFFERS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _require_triton(device: torch.device) -> None:
    if not HAS_TRITON:
        raise RuntimeError("flash_attention: backend='triton' needs the triton package")
    if device.type != "cuda" and not BUILT_FOR_INTERPRETER:
        raise RuntimeError(
            "flash_attention: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
            "antlm_dist.kernels is first imported (for CPU tensors)"
        )


def _common_launch_args(q, causal, kpm, seg, seq_len, head_dim, groups):
    dummy = q  # never read when the matching HAS_* flag is off
    return dict(
        kpm_ptr=kpm if kpm is not None else dummy,
        seg_ptr=seg if seg is not None else dummy,
        stride_pb=kpm.stride(0) if kpm is not None else 0,
        stride_sb=seg.stride(0) if seg is not None else 0,
        SEQ_BUCKET=triton.next_power_of_2(seq_len),
        GROUPS=groups,
        HEAD_DIM=head_dim,
        IS_CAUSAL=bool(causal),
        EVEN=seq_len % _MAX_BLOCK == 0,
        HAS_PADDING=kpm is not None,
        HAS_SEGMENTS=seg is not None,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the Triton forward (FlashAttention-2, Dao 2023).

    Args:
        q: (B, H, T, D) float16/bfloat16/float32 on CUDA (or CPU under TRITON_INTERPRET=1).
        k, v: (B, Hkv, T, D), q's dtype, H % Hkv == 0.
        causal: triangle mask (query t sees keys <= t) when True.
        softmax_scale: defaults to 1/sqrt(D).
        key_padding_mask: (B, T) bool/int, True (nonzero) for a real token, or None.
        segment_ids: (B, T) int, attention stays within equal ids, or None.

    Returns:
        o: (B, H, T, D) q's dtype, contiguous; padded query rows and rows with no
        allowed key are zeros. lse: (B, H, T) float32 natural-log log-sum-exp of the
        scaled scores, +inf on those dead rows.

    Raises:
        ValueError: unsupported dtype or head_dim, mismatched shapes.
        RuntimeError: Triton cannot run on these tensors.
    """
    batch, num_heads, num_kv_heads, seq_len, head_dim = _check_inputs(q, k, v, key_padding_mask, segment_ids)
    _require_triton(q.device)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    kpm, seg = _prepare_masks(key_padding_mask, segment_ids, q.device)
    o = _new_buffer((batch, num_heads, seq_len, head_dim), q.dtype, q.device)
    lse = _new_buffer((batch, num_heads, seq_len), torch.float32, q.device)
    if o.numel() == 0:
        return o.zero_(), lse.fill_(float("inf"))

    def grid(meta):
        return (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * num_heads)

    _flash_attn_fwd_kernel[grid](
        q, k, v, o, lse,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qt=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kt=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vt=v.stride(2),
        stride_ob=o.stride(0), stride_oh=o.stride(1), stride_ot=o.stride(2),
        num_heads=num_heads, seq_len=seq_len, softmax_scale=scale,
        **_common_launch_args(q, causal, kpm, seg, seq_len, head_dim, num_heads // num_kv_heads),
    )
    return o, lse


def flash_attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the Triton backward (FlashAttention-2, Dao 2023): delta, dK/dV, dQ.

    Args:
        do: (B, H, T, D) gradient of the output, q's dtype.
        q, k, v, causal, softmax_scale, key_padding_mask, segment_ids: as given to
            :func:`flash_attention_forward`.
        o: (B, H, T, D) and lse: (B, H, T) float32, as it returned.

    Returns:
        dq (B, H, T, D), dk and dv (B, Hkv, T, D), in the inputs' dtype. Padded query
        rows contribute nothing; padded keys get zero dk and dv.

    Raises:
        ValueError: unsupported dtype or head_dim, mismatched shapes.
        RuntimeError: Triton cannot run on these tensors.
    """
    batch, num_heads, num_kv_heads, seq_len, head_dim = _check_inputs(q, k, v, key_padding_mask, segment_ids)
    if tuple(do.shape) != tuple(q.shape) or tuple(o.shape) != tuple(q.shape):
        raise ValueError(f"flash_attention_backward: do {tuple(do.shape)} and o {tuple(o.shape)} must match q {tuple(q.shape)}")
    if tuple(lse.shape) != (batch, num_heads, seq_len) or lse.dtype != torch.float32:
        raise ValueError(f"flash_attention_backward: lse must be (B, H, T) float32; got {tuple(lse.shape)} {lse.dtype}")
    _require_triton(q.device)
    q, k, v, o = (_last_dim_contiguous(t) for t in (q, k, v, o))
    do = _last_dim_contiguous(do.to(q.dtype))
    lse = lse.contiguous()
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    kpm, seg = _prepare_masks(key_padding_mask, segment_ids, q.device)
    dq = _new_buffer(q.shape, q.dtype, q.device)
    dk = _new_buffer(k.shape, k.dtype, k.device)
    dv = _new_buffer(v.shape, v.dtype, v.device)
    if q.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = _new_buffer((batch, num_heads, seq_len), torch.float32, q.device)
    _flash_attn_bwd_preprocess_kernel[(triton.cdiv(seq_len, _PRE_BLOCK_M), batch * num_heads)](
        o, do, delta,
        o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        num_heads, seq_len,
        HEAD_DIM=head_dim, BLOCK_M=_PRE_BLOCK_M,
    )
    common = _common_launch_args(q, causal, kpm, seg, seq_len, head_dim, num_heads // num_kv_heads)
    strides = dict(
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qt=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kt=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vt=v.stride(2),
        stride_dob=do.stride(0), stride_doh=do.stride(1), stride_dot=do.stride(2),
    )

    def dkdv_grid(meta):
        return (triton.cdiv(seq_len, meta["BLOCK_N"]), batch * num_kv_heads)

    _flash_attn_bwd_dkdv_kernel[dkdv_grid](
        q, k, v, do, lse, delta, dk, dv,
        stride_dkb=dk.stride(0), stride_dkh=dk.stride(1), stride_dkt=dk.stride(2),
        stride_dvb=dv.stride(0), stride_dvh=dv.stride(1), stride_dvt=dv.stride(2),
        num_heads=num_heads, num_kv_heads=num_kv_heads, seq_len=seq_len, softmax_scale=scale,
        **strides, **common,
    )

    def dq_grid(meta):
        return (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * num_heads)

    _flash_attn_bwd_dq_kernel[dq_grid](
        q, k, v, do, lse, delta, dq,
        stride_dqb=dq.stride(0), stride_dqh=dq.stride(1), stride_dqt=dq.stride(2),
        num_heads=num_heads, seq_len=seq_len, softmax_scale=scale,
        **strides, **common,
    )
    return dq, dk, dv


# ---------------------------------------------------------------------- autograd + API


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper over the Triton FlashAttention-2 (Dao 2023) launchers.

    ``apply(q, k, v, causal, softmax_scale, key_padding_mask, segment_ids)``: q (B, H, T, D),
    k and v (B, Hkv, T, D), all float16/bfloat16/float32; masks (B, T). Returns
    o (B, H, T, D) in q's dtype. Saves o and the fp32 log-sum-exp (B, H, T) for the
    backward, which returns dq, dk, dv in the inputs' shapes and dtype.

    Raises:
        ValueError: unsupported dtype or head_dim, mismatched shapes.
        RuntimeError: Triton cannot run on these tensors.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, key_padding_mask, segment_ids):
        o, lse = flash_attention_forward(
            q, k, v, causal=causal, softmax_scale=softmax_scale,
            key_padding_mask=key_padding_mask, segment_ids=segment_ids,
        )
        ctx.save_for_backward(q, k, v, o, lse, key_padding_mask, segment_ids)
        ctx.causal = causal
        ctx.softmax_scale = softmax_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, key_padding_mask, segment_ids = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(
            do, q, k, v, o, lse, causal=ctx.causal, softmax_scale=ctx.softmax_scale,
            key_padding_mask=key_padding_mask, segment_ids=segment_ids,
        )
        return dq, dk, dv, None, None, None, None


def flash_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference with the kernel's semantics: SDPA with an explicit boolean mask.

    The CPU path of :func:`flash_attention` and the oracle for its FlashAttention-2
    (Dao 2023) kernels (pass float64 tensors for that). Any floating dtype and head_dim
    work; memory is O(B·T²) for the mask.

    Args:
        q: (B, H, T, D) floating point.
        k, v: (B, Hkv, T, D), q's dtype, H % Hkv == 0.
        causal: triangle mask when True, bidirectional when False.
        softmax_scale: defaults to 1/sqrt(D).
        key_padding_mask: (B, T) bool/int, True for a real token, or None.
        segment_ids: (B, T) int, attention stays within equal ids, or None.

    Returns:
        (B, H, T, D) in q's dtype. Padded query rows and rows with no allowed key are
        exact zeros (and pass no gradient).

    Raises:
        ValueError: non-floating dtype or mismatched shapes.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if isinstance(t, torch.Tensor) and not t.is_floating_point():
            raise ValueError(f"flash_attention_ref: {name} must be floating point; got {t.dtype}")
    batch, num_heads, num_kv_heads, seq_len, head_dim = _check_inputs(
        q, k, v, key_padding_mask, segment_ids, dtypes=None, head_dims=None
    )
    groups = num_heads // num_kv_heads
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)  # (B, H, T, D)
        v = v.repeat_interleave(groups, dim=1)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    if key_padding_mask is None and segment_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal), scale=scale)
    allowed = torch.ones(batch, 1, seq_len, seq_len, dtype=torch.bool, device=q.device)  # (B, 1, T, T)
    if causal:
        allowed = allowed & torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
    real = None
    if key_padding_mask is not None:
        real = key_padding_mask.to(q.device) != 0  # (B, T)
        allowed = allowed & real[:, None, None, :]
    if segment_ids is not None:
        seg = segment_ids.to(q.device)
        allowed = allowed & (seg[:, None, :, None] == seg[:, None, None, :])
    live = allowed.any(dim=-1, keepdim=True)  # (B, 1, T, 1)
    if real is not None:
        live = live & real[:, None, :, None]
    # Dead rows attend everywhere so the softmax stays finite; they are zeroed below.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~live, scale=scale)
    return torch.where(live, out, torch.zeros((), dtype=out.dtype, device=out.device))


def _use_triton(q: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"flash_attention: backend={backend!r} is not known; use one of {', '.join(BACKENDS)}")
    if backend == "triton":
        _require_triton(q.device)
    return use_triton(backend, q.device, "flash_attention", built_for_interpreter=BUILT_FOR_INTERPRETER)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Flash attention (FlashAttention-2, Dao 2023) with AntLM's causal/bidirectional switch.

    Args:
        q: (B, H, T, D) float16/bfloat16/float32; D in 16, 32, 64, 128.
        k, v: (B, Hkv, T, D), q's dtype and device; H % Hkv == 0 (grouped-query).
        causal: True for the CLM mask (query t sees keys <= t), False for the
            bidirectional MLM mask. Each mode runs its own compiled kernel.
        softmax_scale: defaults to 1/sqrt(D).
        key_padding_mask: (B, T) bool (or int, nonzero = real), True for a real token.
        segment_ids: (B, T) int document ids of packed sequences; a token attends only
            within its id. Combines with ``causal`` and ``key_padding_mask``.
        backend: "auto" runs Triton where it can run (CUDA tensors, or CPU tensors when
            TRITON_INTERPRET=1 was set before this module was imported), else the torch
            reference; "triton" or "torch" force one. Models pass the backend resolved
            once by :func:`antlm_dist.kernels.backend.resolve_backends`.

    Returns:
        (B, H, T, D) in q's dtype. Rows of padded query positions are exact zeros, a
        query row with no allowed key is zeros (never NaN), and neither passes any
        gradient. Differentiable in q, k and v.

    Raises:
        ValueError: unsupported dtype or head_dim, mismatched shapes or an unknown
            ``backend``, each naming the argument.
        RuntimeError: ``backend="triton"`` where Triton cannot run.
    """
    _check_inputs(q, k, v, key_padding_mask, segment_ids)
    if _use_triton(q, backend):
        return FlashAttentionFunction.apply(q, k, v, bool(causal), softmax_scale, key_padding_mask, segment_ids)
    return flash_attention_ref(
        q, k, v, causal=causal, softmax_scale=softmax_scale,
        key_padding_mask=key_padding_mask, segment_ids=segment_ids,
    )
