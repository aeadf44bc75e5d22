"""``metrics.jsonl``: one JSON record per line, written by rank 0 only."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path


def _nonfinite(value) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _clean(value):
    """Non-finite floats become JSON ``null`` (strict JSON has no NaN or Infinity)."""
    if _nonfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class MetricsWriter:
    """Append records to ``path`` (line-buffered, flushed per record). No-op when disabled.

    A NaN or ±inf field is written as ``null``, and the record gets ``"nonfinite": [names]``.

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
        bad = [k for k, v in fields.items() if _nonfinite(v)]
        if bad:  # the names of the fields written as null because they were NaN or ±inf
            record["nonfinite"] = bad
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


def drop_records_after(path: Path, step: int) -> int:
    """Remove the records of steps after ``step`` from ``path``; returns how many.

    A run killed after its last checkpoint logged steps that a resume from that checkpoint
    trains again; without this, metrics.jsonl would hold those steps twice. Records without
    a ``step`` are kept. The file is replaced atomically (a temporary file, then a rename).
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec_step = json.loads(line).get("step")
        if isinstance(rec_step, int) and rec_step > step:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


def read_metrics(path: Path, kind: str | None = None) -> list[dict]:
    """All records of ``path`` (optionally of one ``type``), in file order."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            if kind is None or rec.get("type") == kind:
                out.append(rec)
    return out
