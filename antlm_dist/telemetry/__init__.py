"""Telemetry shared by ``antlm-bench`` and the trainer: GPU power and energy through NVML,
process RSS and CPU utilisation through psutil. See :mod:`antlm_dist.telemetry.monitor`."""

from antlm_dist.telemetry.monitor import Sample, Telemetry, Window, WindowSummary

__all__ = ["Sample", "Telemetry", "Window", "WindowSummary"]
