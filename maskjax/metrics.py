"""Metric writers (metrics.jsonl + TensorBoard event files, no TensorFlow), a progress line, and
PNG grids a person can look at."""
from __future__ import annotations

import io
import json
import sys
import time

import numpy as np
from PIL import Image

from maskjax import storage


class Writer:
    """Appends one JSON object per log step to ``metrics.jsonl`` and mirrors scalars and images to
    TensorBoard, in a local or object-store workdir. Only the writing process (process 0) should
    construct one with ``enabled=True``."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = storage.join(workdir, "metrics.jsonl")
        self._jsonl = storage.Appender(self.path)
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            _register_object_store_events()
            self._tb = SummaryWriter(storage.join(workdir, "tensorboard"), flush_secs=30)

    def truncate_after(self, step: int) -> None:
        """Drops records past ``step`` (written after the checkpoint a run resumes from), so a
        resumed run's history is the uninterrupted run's history."""
        if not self.enabled or not storage.exists(self.path):
            return
        kept = [json.dumps(r) + "\n" for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        self._jsonl.replace("".join(kept))

    def scalars(self, step: int, values: dict, jsonl: bool = True) -> None:
        """One record per call; ``jsonl=False`` writes TensorBoard only (eval scalars)."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        if jsonl:
            self._jsonl.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        if self.enabled:
            self._tb.add_image(tag, image, step, dataformats="HWC")

    def flush(self) -> None:
        """Makes everything written so far durable (object stores batch their rewrites)."""
        if self.enabled:
            self._jsonl.flush()
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._jsonl.close()
            self._tb.close()


class _ObjectStoreEvents:
    """A TensorBoard event file on an object store: tensorboardX's record-writer interface, the whole
    file rewritten at each flush (objects are immutable; tensorboardX's own gs:// writer does the same
    but needs google-cloud-storage; this one goes through :mod:`maskjax.storage`)."""

    def __init__(self, path: str):
        self._buffer = bytearray()
        self._path = path

    def write(self, data: bytes) -> None:
        self._buffer += data

    def flush(self) -> None:
        if self._buffer:
            storage.write_bytes(self._path, bytes(self._buffer))

    def close(self) -> None:
        self.flush()


class _ObjectStoreEventsFactory:
    def open(self, path):
        return _ObjectStoreEvents(path)

    def directory_check(self, path):
        pass  # object stores have no directories


def _register_object_store_events() -> None:
    from tensorboardX import record_writer

    for prefix in ("gs", "s3"):
        record_writer.register_writer_factory(prefix, _ObjectStoreEventsFactory())


def _plain(value):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file; a last line cut short by a killed writer is left out."""
    records = []
    lines = [line for line in storage.read_text(path).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i != len(lines) - 1:
                raise
    return records


class Progress:
    """One status line: step, loss, examples/s, ms/step and ETA. Rewritten in place on a terminal,
    one line per log step otherwise (CI logs, files)."""

    def __init__(self, total_steps: int, start_step: int, batch_size: int, enabled: bool = True, stream=None):
        self.total, self.batch = total_steps, batch_size
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last_step, self.last_time = start_step, time.perf_counter()

    def rate(self, step: int) -> tuple[float, float]:
        """(examples/s, s/step) since the previous call; resets the window."""
        now = time.perf_counter()
        steps = max(step - self.last_step, 1)
        seconds_per_step = (now - self.last_time) / steps
        self.last_step, self.last_time = step, now
        return self.batch / max(seconds_per_step, 1e-9), seconds_per_step

    def show(self, step: int, loss: float, examples_per_sec: float, seconds_per_step: float) -> None:
        if not self.enabled:
            return
        eta = format_seconds((self.total - step) * seconds_per_step)
        line = (f"step {step}/{self.total} | loss {loss:.4f} | {examples_per_sec:,.0f} ex/s | "
                f"{seconds_per_step * 1e3:.0f} ms/step | ETA {eta}")
        self.stream.write(("\r" + line + " " * 4) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\n" if self.tty else "") + text + "\n")
            self.stream.flush()


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def image_grid(rows: list[np.ndarray], mean, std, scale: int = 8, pad: int = 2) -> np.ndarray:
    """rows: list of [N, H, W, C] normalised images (one row per kind) -> uint8 [H', W', 3] grid.

    Pixels are de-normalised with ``mean``/``std`` and enlarged ``scale`` times (nearest) so 16-pixel
    digits are readable.
    """
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    rows = [np.clip(np.asarray(r, np.float32) * std + mean, 0.0, 1.0) for r in rows]
    n, h, w, c = rows[0].shape
    cell_h, cell_w = h * scale + pad, w * scale + pad
    grid = np.ones((len(rows) * cell_h + pad, n * cell_w + pad, 3), np.float32)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            img = np.repeat(np.repeat(img, scale, 0), scale, 1)
            img = np.repeat(img, 3, -1) if c == 1 else img[..., :3]
            grid[pad + i * cell_h: pad + i * cell_h + h * scale, pad + j * cell_w: pad + j * cell_w + w * scale] = img
    return (grid * 255).round().astype(np.uint8)


def save_png(path: str, image: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    storage.write_bytes(path, buffer.getvalue())
