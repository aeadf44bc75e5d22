"""Stopping a run whose loss or gradients are no longer finite.

A diverged model (a learning rate far too high, bad data, an fp16 overflow that never
recovers) does not crash: DeepSpeed prints "OVERFLOW! Skipping step" and leaves the weights
unchanged, or the loss turns NaN, and the run would otherwise train to the end, write its
summary and exit 0. :class:`NonFiniteGuard` counts consecutive optimizer steps that are
not finite; after ``train.max_nonfinite_steps`` of them the trainer stops every rank with
:data:`NONFINITE_EXIT_CODE`, and no checkpoint is written from a non-finite step, so the
last good checkpoint stays ``latest``.

Every input of :meth:`NonFiniteGuard.update` is the same on all ranks (the loss is
all-reduced, the gradient norm is global, DeepSpeed all-reduces its overflow flag), so all
ranks reach the same decision without another collective.
"""
from __future__ import annotations

import logging
import math

log = logging.getLogger("antlm_dist")

NONFINITE_EXIT_CODE = 3
"""Exit status of a rank stopped because its loss or gradient norm stayed non-finite."""


class NonFiniteGuard:
    """Counts consecutive non-finite optimizer steps.

    A step is non-finite when its global loss (nats per target token) or its global
    gradient 2-norm is NaN or ±inf, or when DeepSpeed skipped it for an overflow.

    Args:
        max_steps: consecutive non-finite steps after which :attr:`exhausted` is true (>= 1).

    Raises:
        ValueError: ``max_steps`` < 1.
    """

    def __init__(self, max_steps: int):
        if max_steps < 1:
            raise ValueError(f"train.max_nonfinite_steps={max_steps} must be >= 1")
        self.max_steps = max_steps
        self.consecutive = 0
        self.last_finite: tuple[int, str, float] | None = None  # (step, phase, loss)

    def update(self, step: int, phase: str, loss: float, grad_norm: float | None, skipped: bool) -> bool:
        """Record optimizer step ``step`` of ``phase``; returns True when it was finite."""
        finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)) and not skipped
        if finite:
            self.consecutive = 0
            self.last_finite = (step, phase, loss)
            return True
        self.consecutive += 1
        log.warning("step %d (%s) is not finite: loss %s, gradient norm %s%s (%d of %d in a row allowed)",
                    step, phase, loss, grad_norm, ", skipped by DeepSpeed" if skipped else "",
                    self.consecutive, self.max_steps)
        return False

    @property
    def exhausted(self) -> bool:
        return self.consecutive >= self.max_steps

    def message(self, step: int, phase: str) -> str:
        """Why the run stops at ``step``: the count, the phase and the last finite loss."""
        last = ("no finite step in this run" if self.last_finite is None else
                f"last finite loss {self.last_finite[2]:.4f} at step {self.last_finite[0]} ({self.last_finite[1]})")
        return (f"{self.consecutive} consecutive non-finite optimizer step(s) up to step {step} ({phase}); {last}. "
                "The model diverged: lower train.lr or raise train.warmup_steps, then --resume from the last "
                "good checkpoint (no checkpoint was written from a non-finite step)")
