"""Triton kernels with torch reference paths, installed as ``antlm_dist.kernels``.

The public names (``flash_attention``, ``masked_token_loss``, their ``_ref`` twins and
``FlashAttentionFunction``) are imported on first use (PEP 562 ``__getattr__``), not with
the package: ``antlm-train``'s preflight reads ``antlm_dist.kernels.backend`` and should not
pay for importing Triton (about 80 MiB and a second or two) in a process that trains nothing.
"""
import importlib
import sys
import types

_EXPORTS = {
    "FlashAttentionFunction": "flash_attention",
    "flash_attention": "flash_attention",
    "flash_attention_ref": "flash_attention",
    "masked_token_loss": "masked_token_loss",
    "masked_token_loss_ref": "masked_token_loss",
}
"""Public name -> the kernel module that defines it."""


class _KernelsPackage(types.ModuleType):
    def __setattr__(self, name, value):
        # Importing a submodule binds it on its package under its own name; two modules share
        # their name with their public function, and ``antlm_dist.kernels.flash_attention``
        # has always meant the function.
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


for _name in _EXPORTS:  # a reload of this package forgets the names an earlier import bound
    globals().pop(_name, None)
sys.modules[__name__].__class__ = _KernelsPackage
