"""Which implementation each kernel runs, decided once when a model is built.

:func:`resolve_backends` maps the two settings (``model.attention``, ``model.loss``) to
concrete backends for one device and checks that they can run there, with the head dim
the attention kernel supports. The model stores the answer and passes it explicitly to
every kernel call; nothing decides again per call. The trainer's preflight calls the same
function, so an impossible choice stops the run before any rank starts.

``triton`` can run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set
before the kernel modules were imported (Triton's interpreter, slow; for tests).
This module imports nothing from ``antlm_dist``.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

import torch

# Found, not imported: a launcher that only runs the preflight should not pay for importing triton.
HAS_TRITON = importlib.util.find_spec("triton") is not None

FLASH_ATTENTION_HEAD_DIMS = (16, 32, 64, 128)
"""Head dims the Triton flash-attention kernel is built for (``flash_attention.FLASH_ATTENTION_HEAD_DIMS``)."""
ATTENTION_CHOICES = ("auto", "sdpa", "triton", "eager")
LOSS_CHOICES = ("auto", "triton", "torch")


class BackendError(ValueError):
    """A kernel backend that cannot run here; the message names the setting and the fix."""


@dataclasses.dataclass(frozen=True)
class KernelBackends:
    """attention: ``"sdpa"``, ``"triton"`` or ``"eager"``. loss: ``"triton"`` or ``"torch"``."""

    attention: str
    loss: str


def triton_available() -> bool:
    """The ``triton`` package imports."""
    return HAS_TRITON


def interpreter_requested() -> bool:
    """``TRITON_INTERPRET`` asks for Triton's interpreter. Kernel modules read it once, when
    they are imported (their ``@triton.jit`` decorators are built for it then)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_runs_on(device: torch.device | str, built_for_interpreter: bool | None = None) -> bool:
    """Triton kernels can run on ``device``: CUDA, or any device when the kernels were built
    for the interpreter (``built_for_interpreter``, the kernel module's own flag; default:
    :func:`interpreter_requested` now, for the resolver at start-up)."""
    built = interpreter_requested() if built_for_interpreter is None else built_for_interpreter
    return HAS_TRITON and (torch.device(device).type == "cuda" or built)


def _why_not_triton(device: torch.device) -> str:
    if not triton_available():
        return "the triton package is not installed"
    return (f"Triton kernels need a CUDA device and this run uses {device.type} (set TRITON_INTERPRET=1 before the "
            "start to run them in Triton's slow interpreter, for tests)")


def resolve_attention(choice: str, device: torch.device, *, head_dim: int, triton_supported: bool = True,
                      arch: str = "llama") -> str:
    """``model.attention`` → ``"sdpa"``, ``"triton"`` or ``"eager"`` for ``device``.

    ``auto`` is ``triton`` on CUDA when the kernel supports the backbone and ``head_dim``,
    else ``sdpa``.

    Raises:
        BackendError: an unknown choice; ``triton`` for a backbone the kernel does not
            support (``triton_supported=False``), where Triton cannot run, or with a head
            dim outside the kernel's; each naming ``model.attention`` and the fix.
    """
    if choice not in ATTENTION_CHOICES:
        raise BackendError(f"model.attention={choice!r} is not known; use one of {', '.join(ATTENTION_CHOICES)}")
    if choice == "auto":
        fits = triton_supported and head_dim in FLASH_ATTENTION_HEAD_DIMS
        return "triton" if fits and device.type == "cuda" and triton_available() else "sdpa"
    if choice != "triton":
        return choice
    if not triton_supported:
        raise BackendError(f"model.attention=triton is not available for model.arch={arch} (the Triton kernel "
                           "takes no relative-position bias); use model.attention=sdpa or eager")
    if not triton_runs_on(device):
        raise BackendError(f"model.attention=triton cannot run here: {_why_not_triton(device)}; "
                           "use model.attention=sdpa (or auto)")
    if head_dim not in FLASH_ATTENTION_HEAD_DIMS:
        raise BackendError(
            f"model.attention=triton supports head dims {', '.join(map(str, FLASH_ATTENTION_HEAD_DIMS))}, but "
            f"model.hidden_size / model.num_attention_heads = {head_dim}; change those two so that their "
            "ratio is a supported head dim, or use model.attention=sdpa"
        )
    return "triton"


def resolve_loss(choice: str, device: torch.device) -> str:
    """``model.loss`` → ``"triton"`` or ``"torch"`` for ``device``; ``auto`` is ``triton`` on CUDA.

    Raises:
        BackendError: an unknown choice, or ``triton`` where Triton cannot run.
    """
    if choice not in LOSS_CHOICES:
        raise BackendError(f"model.loss={choice!r} is not known; use one of {', '.join(LOSS_CHOICES)}")
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if choice == "triton" and not triton_runs_on(device):
        raise BackendError(f"model.loss=triton cannot run here: {_why_not_triton(device)}; "
                           "use model.loss=torch (or auto)")
    return choice


def resolve_backends(attention: str, loss: str, device: torch.device | str | None = None, *, head_dim: int,
                     triton_attention: bool = True, arch: str = "llama") -> KernelBackends:
    """Both backends for ``device`` (default: CUDA when available, else the CPU).

    Args:
        attention, loss: ``model.attention`` and ``model.loss``.
        head_dim: hidden size / query heads.
        triton_attention: the backbone can use the Triton attention kernel.
        arch: ``model.arch``, for messages.

    Raises:
        BackendError: see :func:`resolve_attention` and :func:`resolve_loss`.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return KernelBackends(
        attention=resolve_attention(attention, device, head_dim=head_dim, triton_supported=triton_attention,
                                    arch=arch),
        loss=resolve_loss(loss, device),
    )


def use_triton(backend: str, device: torch.device, kernel: str, *, built_for_interpreter: bool) -> bool:
    """A kernel's own ``backend`` argument → run Triton or not, for direct callers of the
    kernel functions (models pass an already resolved ``"triton"`` or ``"torch"``).

    ``auto``: Triton where it can run. ``triton``: Triton, or a RuntimeError naming
    ``kernel`` where it cannot. ``built_for_interpreter``: the calling kernel module's flag.
    """
    if backend == "torch":
        return False
    runs = triton_runs_on(device, built_for_interpreter)
    if backend == "triton" and not runs:
        raise RuntimeError(f"{kernel}: backend='triton' cannot run here: {_why_not_triton(torch.device(device))}")
    return runs
