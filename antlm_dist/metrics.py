"""``metrics.jsonl``: one JSON record per line, written by rank 0 only."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class MetricsWriter:
    """Append records to ``path`` (line-buffered, flushed per record). No-op when disabled.

    ``sink``, when given, is called as ``sink(kind, record)`` after each record is written
    (the experiment trackers of :mod:`antlm_dist.trackers`), and its ``close()`` on close.
    """

    def __init__(self, path: Path, enabled: bool, sink=None):
        self.path = Path(path)
        self.enabled = enabled
        self.sink = sink if enabled else None
        self._f = open(self.path, "a", encoding="utf-8", buffering=1) if enabled else None

    def write(self, kind: str, **fields) -> None:
        if not self.enabled:
            return
        record = {"type": kind, "time": round(time.time(), 3), **{k: _clean(v) for k, v in fields.items()}}
        self._f.write(json.dumps(record) + "\n")
        if self.sink is not None:
            self.sink(kind, record)

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
            self.sink = None
        if self._f is not None:
            self._f.close()
            self._f = None


def read_metrics(path: Path, kind: str | None = None) -> list[dict]:
    """All records of ``path`` (optionally of one ``type``), in file order."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            if kind is None or rec.get("type") == kind:
                out.append(rec)
    return out
