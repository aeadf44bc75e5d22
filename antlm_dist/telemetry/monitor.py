"""Device and process telemetry sampled in a background thread.

One :class:`Telemetry` object per process watches one accelerator and this process:

* GPU, through NVML (``import pynvml`` from the ``nvidia-ml-py`` package): board power
  (W, ``nvmlDeviceGetPowerUsage``), SM utilisation (%), memory used on the device (GiB),
  SM clock (MHz), and energy (J) as the difference of
  ``nvmlDeviceGetTotalEnergyConsumption`` (a mJ counter since driver load, Volta and
  newer) between the two ends of a window. Where the counter is not supported, energy
  is the trapezoid integral of the sampled power instead (``energy_source`` says which).
* This process: resident set size (GiB, psutil) and CPU utilisation (% of one core, so
  200 means two busy cores), from the process's CPU-time difference over the window
  (``time.process_time``).

Without NVML (no driver: ``nvmlInit`` raises ``pynvml.NVMLError_LibraryNotFound``, or no
GPU), telemetry logs that once per process and goes on with the psutil figures; the GPU
fields are then ``None``.

Interface: :meth:`Telemetry.start`, :meth:`Telemetry.stop`, :meth:`Telemetry.snapshot`
and :meth:`Telemetry.window`, a context manager whose :class:`WindowSummary` gives
averages, peaks and energy over the ``with`` block. The object is also a context manager
(start on enter, stop on exit).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Any

log = logging.getLogger("antlm_dist.telemetry")

_GIB = float(1 << 30)
_NVML_ABSENT_LOGGED = False


def _log_nvml_absent_once(reason: str) -> None:
    global _NVML_ABSENT_LOGGED
    if not _NVML_ABSENT_LOGGED:
        _NVML_ABSENT_LOGGED = True
        log.info("telemetry: NVML is not available (%s); GPU power, energy, utilisation and clocks are "
                 "not recorded, process RSS and CPU utilisation are", reason)


@dataclasses.dataclass
class Sample:
    """One reading. GPU fields are ``None`` without NVML.

    t_s: ``time.perf_counter()`` seconds. power_w: board power draw (W).
    sm_util_pct: SM utilisation over NVML's last sample period (%). mem_used_gib: device
    memory in use by all processes (GiB). sm_clock_mhz: SM clock (MHz). rss_gib: this
    process's resident set size (GiB).
    """

    t_s: float
    rss_gib: float
    power_w: float | None = None
    sm_util_pct: float | None = None
    mem_used_gib: float | None = None
    sm_clock_mhz: float | None = None


@dataclasses.dataclass
class WindowSummary:
    """Figures over one window. GPU fields are ``None`` without NVML.

    duration_s: wall time (s). energy_j: GPU energy (J). energy_source: ``"counter"``
    (``nvmlDeviceGetTotalEnergyConsumption`` difference), ``"power_integral"`` or
    ``None``. power_w: mean power (W) = energy_j / duration_s when energy is known.
    sm_util_pct, sm_clock_mhz: means of the samples. mem_used_gib: device-memory peak of
    the samples (GiB). rss_peak_gib: RSS peak of the samples (GiB). cpu_util_pct: this
    process's CPU time / wall time × 100. n_samples: readings in the window (the two
    taken at its ends included).
    """

    duration_s: float
    rss_peak_gib: float
    cpu_util_pct: float
    n_samples: int
    power_w: float | None = None
    energy_j: float | None = None
    energy_source: str | None = None
    sm_util_pct: float | None = None
    sm_clock_mhz: float | None = None
    mem_used_gib: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def gpu_metrics(self) -> dict[str, float]:
        """``{"power_w", "energy_j"}`` when measured (GPU), else ``{}``: for ``metrics.jsonl``."""
        if self.energy_j is None:
            return {}
        return {"power_w": self.power_w, "energy_j": self.energy_j}


class Window:
    """A measurement window; see :meth:`Telemetry.window`. ``summary`` is ready after exit.

    Exit only takes the end readings; the samples are gathered and summarised when
    ``summary`` is first read, so a window nobody reads (the trainer opens one per step
    and reads it on logging steps) costs no pass over the sample buffer.
    """

    def __init__(self, telemetry: "Telemetry"):
        self._tel = telemetry
        self._last: Sample | None = None
        self._summary: WindowSummary | None = None

    def __enter__(self) -> "Window":
        tel = self._tel
        self._cpu0 = tel._cpu_time_s()
        self._energy0 = tel._energy_mj()
        self._first = tel._record()
        return self

    def __exit__(self, *exc) -> None:
        tel = self._tel
        self._last = tel._record()
        self._energy1 = tel._energy_mj()
        self._cpu1 = tel._cpu_time_s()
        self._has_gpu = tel.has_gpu  # stop() releases NVML; the summary may be read after it

    @property
    def summary(self) -> WindowSummary | None:
        """:class:`WindowSummary` of the window (None until it has exited)."""
        if self._summary is None and self._last is not None:
            self._summary = self._summarize()
        return self._summary

    def _summarize(self) -> WindowSummary:
        tel, last, energy1, cpu1 = self._tel, self._last, self._energy1, self._cpu1
        samples = tel._samples_between(self._first.t_s, last.t_s)
        duration = max(last.t_s - self._first.t_s, 1e-12)
        summary = WindowSummary(
            duration_s=duration,
            rss_peak_gib=max(s.rss_gib for s in samples),
            cpu_util_pct=100.0 * (cpu1 - self._cpu0) / duration,
            n_samples=len(samples),
        )
        if self._has_gpu:
            power = [(s.t_s, s.power_w) for s in samples if s.power_w is not None]
            if self._energy0 is not None and energy1 is not None:
                summary.energy_j, summary.energy_source = (energy1 - self._energy0) / 1000.0, "counter"
            elif len(power) >= 2:
                summary.energy_j = sum(0.5 * (p0 + p1) * (t1 - t0) for (t0, p0), (t1, p1) in zip(power, power[1:]))
                summary.energy_source = "power_integral"
            if summary.energy_j is not None:
                summary.power_w = summary.energy_j / duration
            summary.sm_util_pct = mean_or_none(s.sm_util_pct for s in samples)
            summary.sm_clock_mhz = mean_or_none(s.sm_clock_mhz for s in samples)
            summary.mem_used_gib = max((s.mem_used_gib for s in samples if s.mem_used_gib is not None), default=None)
        return summary


def mean_or_none(values) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


class Telemetry:
    """Background sampler of one GPU (NVML) and this process (psutil).

    Args:
        device: a ``torch.device``, ``"cuda:1"``, an NVML index, or ``None``/CPU for
            process figures only. A CUDA device is located in NVML by its UUID (NVML
            ignores ``CUDA_VISIBLE_DEVICES``), falling back to its index.
        interval_s: seconds between background samples (default 0.1). NVML itself
            refreshes power about every 20–100 ms, depending on the board.
        max_samples: ring-buffer length; windows longer than
            ``interval_s × max_samples`` see only the newest samples (peaks and means;
            the energy counter and CPU time are exact at any length).

    Raises nothing on a machine without NVML: see the module docstring.
    """

    def __init__(self, device: Any = None, interval_s: float = 0.1, max_samples: int = 100_000):
        import psutil

        self.interval_s = float(interval_s)
        self._proc = psutil.Process()
        self._samples: collections.deque[Sample] = collections.deque(maxlen=max_samples)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = None
        self._handle = None
        self._energy_supported = True
        index = _gpu_index(device)
        if index is not None:
            self._init_nvml(device, index)

    # -------------------------------------------------------------- NVML set-up
    def _init_nvml(self, device: Any, index: int) -> None:
        try:
            import pynvml
        except ImportError:
            _log_nvml_absent_once("the nvidia-ml-py package is not installed")
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError_LibraryNotFound:
            _log_nvml_absent_once("nvmlInit: NVML library not found")
            return
        except pynvml.NVMLError as exc:
            _log_nvml_absent_once(f"nvmlInit: {exc}")
            return
        handle = None
        uuid = _cuda_uuid(device, index)
        if uuid is not None:
            try:
                handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
            except Exception:  # noqa: BLE001 - NVMLError, or a str/bytes mismatch in older bindings
                handle = None
        if handle is None:
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            except pynvml.NVMLError as exc:
                _log_nvml_absent_once(f"no NVML device {index}: {exc}")
                pynvml.nvmlShutdown()
                return
        self._nvml, self._handle = pynvml, handle

    @property
    def has_gpu(self) -> bool:
        """True when NVML figures are being recorded."""
        return self._handle is not None

    # -------------------------------------------------------------- readings
    def _energy_mj(self) -> float | None:
        if self._handle is None or not self._energy_supported:
            return None
        try:
            return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except self._nvml.NVMLError:
            self._energy_supported = False  # e.g. NVMLError_NotSupported on pre-Volta boards
            return None

    @staticmethod
    def _cpu_time_s() -> float:
        # user + system time of every thread of this process, at clock_gettime resolution
        # (psutil's cpu_times counts 10 ms clock ticks, too coarse for short steps)
        return time.process_time()

    def _read(self) -> Sample:
        sample = Sample(t_s=time.perf_counter(), rss_gib=self._proc.memory_info().rss / _GIB)
        if self._handle is not None:
            nv, h = self._nvml, self._handle
            sample.power_w = self._try(lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0)  # mW -> W
            sample.sm_util_pct = self._try(lambda: float(nv.nvmlDeviceGetUtilizationRates(h).gpu))
            sample.mem_used_gib = self._try(lambda: nv.nvmlDeviceGetMemoryInfo(h).used / _GIB)
            sample.sm_clock_mhz = self._try(lambda: float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)))
        return sample

    def _try(self, fn):
        try:
            return fn()
        except self._nvml.NVMLError:
            return None

    def _record(self) -> Sample:
        sample = self._read()
        with self._lock:
            self._samples.append(sample)
        return sample

    def _samples_between(self, t0: float, t1: float) -> list[Sample]:
        with self._lock:
            return sorted((s for s in self._samples if t0 <= s.t_s <= t1), key=lambda s: s.t_s)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._record()

    # -------------------------------------------------------------- public interface
    def start(self) -> "Telemetry":
        """Start the background sampler (idempotent). Returns ``self``."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="antlm-telemetry", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the sampler and release NVML. Windows still work afterwards (end readings only)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
            self._nvml, self._handle = None, None

    def snapshot(self) -> Sample:
        """A reading now (also added to the buffer)."""
        return self._record()

    def window(self) -> Window:
        """``with telemetry.window() as w: ...`` then ``w.summary`` (:class:`WindowSummary`)."""
        return Window(self)

    def __enter__(self) -> "Telemetry":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _gpu_index(device: Any) -> int | None:
    """NVML index for ``device``, or ``None`` for a CPU / missing device."""
    if device is None:
        return None
    if isinstance(device, int):
        return device
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    if dev.index is not None:
        return dev.index
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def _cuda_uuid(device: Any, index: int) -> str | None:
    """``"GPU-…"`` of a CUDA device as torch sees it, to find the same board in NVML."""
    try:
        import torch

        if isinstance(device, int) or not torch.cuda.is_available():
            return None
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
    except Exception:  # noqa: BLE001 - older torch without .uuid, or no CUDA
        return None
