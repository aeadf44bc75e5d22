"""Triton kernels with torch reference paths, installed as ``antlm_dist.kernels``.

Each kernel module is imported on its own guard: a sibling module that is not there
yet must not hide the others. Errors raised inside a module that exists still surface.
"""

try:
    from .flash_attention import FlashAttentionFunction, flash_attention, flash_attention_ref  # noqa: F401
except ModuleNotFoundError as exc:  # pragma: no cover - only while the module is absent
    if exc.name != f"{__name__}.flash_attention":
        raise

try:
    from .masked_token_loss import masked_token_loss, masked_token_loss_ref  # noqa: F401  (Triton is optional inside the module)
except ModuleNotFoundError as exc:  # pragma: no cover - only while the module is absent
    if exc.name != f"{__name__}.masked_token_loss":
        raise
