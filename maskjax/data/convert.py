"""``maskjax data convert``: a TFDS dataset prepared in TFRecord format (TFDS's default, what ``tfds build``
writes without ``--file_format``) becomes the same dataset in array_record, which the Grain loader reads
with random access. No TensorFlow: a TFRecord file is a sequence of framed records (length, masked
CRC-32C of the length, bytes, masked CRC-32C of the bytes), and TFDS stores the same serialized
``tf.train.Example`` in both formats, so each record is copied unchanged, after both checksums are verified.

Shards keep their names and split boundaries (``NAME-SPLIT.tfrecord-00003-of-01024`` ->
``NAME-SPLIT.array_record-00003-of-01024``); every shard's record count is checked against
``dataset_info.json``, which is written last (with ``fileFormat: array_record``), so a conversion that
dies leaves the TFRecord dataset readable and can simply be run again. Source and target may be local
or on an object store (``gs://``); array_record files are written locally and uploaded.
"""
from __future__ import annotations

import json
import os
import re
import struct
import sys
import tempfile
from typing import Iterator

from maskjax import storage
from maskjax.data import sources
from maskjax.data.sources import DataError

_SHARD = re.compile(r"^(?P<prefix>.+)\.tfrecord-(?P<index>\d{5})-of-(?P<count>\d{5})$")
_MASK_DELTA = 0xA282EAD8


def _masked_crc(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def tfrecords(path: str) -> Iterator[bytes]:
    """The records of one TFRecord file, each checked against both of its CRC-32Cs."""
    with storage.open_file(path, "rb") as f:
        offset = 0
        while True:
            header = f.read(12)
            if not header:
                return
            if len(header) != 12:
                raise DataError(f"{path}: truncated TFRecord header at byte {offset}")
            length, length_crc = struct.unpack("<QI", header)
            if _masked_crc(header[:8]) != length_crc:
                raise DataError(f"{path}: the length of the record at byte {offset} fails its CRC (not a TFRecord "
                                "file, or damaged)")
            body = f.read(length + 4)
            if len(body) != length + 4:
                raise DataError(f"{path}: the record at byte {offset} is cut short ({len(body) - 4} of {length} bytes)")
            data, data_crc = body[:length], struct.unpack("<I", body[length:])[0]
            if _masked_crc(data) != data_crc:
                raise DataError(f"{path}: the record at byte {offset} fails its CRC (damaged)")
            yield data
            offset += 12 + length + 4


def find(name: str, data_dir: str) -> str:
    """The prepared version directory of ``name`` in ``data_dir`` (:func:`sources.prepared_dir`) or a DataError."""
    found = sources.prepared_dir(name, data_dir)
    if found is None:
        raise DataError(f"dataset {name!r} is not prepared in {data_dir!r} (no "
                        f"{storage.join(data_dir, *name.partition(':')[0].split('/'))}/VERSION/dataset_info.json)")
    return found


def convert(name: str, data_dir: str, out: str | None = None, progress=sys.stderr) -> dict:
    """Converts the TFRecord shards of dataset ``name`` in ``data_dir`` into array_record shards in
    ``out`` (default: beside them, in ``data_dir``); returns {split: examples}."""
    from array_record.python import array_record_module

    source = find(name, data_dir)
    out_dir = storage.join(out, storage.relative(source, data_dir)) if out else source
    info = json.loads(storage.read_text(storage.join(source, "dataset_info.json")))
    fmt = info.get("fileFormat", "tfrecord")
    if fmt != "tfrecord":
        raise DataError(f"dataset {name!r} in {source} is in {fmt!r} format, not TFRecord: nothing to convert")
    lengths = {s["name"]: [int(n) for n in s.get("shardLengths", [])] for s in info.get("splits", [])}
    names = storage.listdir(source)
    shards = [(n, _SHARD.match(n)) for n in names]
    shards = [(n, m) for n, m in shards if m]
    if not shards:
        raise DataError(f"{source} has no TFRecord shards (NAME-SPLIT.tfrecord-NNNNN-of-NNNNN)")
    counts: dict[str, int] = {}
    for shard, match in shards:
        split = match["prefix"].rsplit("-", 1)[-1]
        index, total = int(match["index"]), int(match["count"])
        target = storage.join(out_dir, f"{match['prefix']}.array_record-{match['index']}-of-{match['count']}")
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "shard") if storage.remote(target) else target + ".tmp"
            os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
            writer = array_record_module.ArrayRecordWriter(local, "group_size:1")  # as TFDS writes them
            n = 0
            for record in tfrecords(storage.join(source, shard)):
                writer.write(record)
                n += 1
            writer.close()
            if split in lengths and len(lengths[split]) == total and lengths[split][index] != n:
                os.remove(local)
                raise DataError(f"{source}/{shard}: {n} records, dataset_info.json says {lengths[split][index]}")
            if storage.remote(target):
                storage.copy_file(local, target)
            else:
                os.replace(local, target)
        counts[split] = counts.get(split, 0) + n
        if progress is not None:
            progress.write(f"{shard}: {n} records -> {storage.basename(target)}\n")
            progress.flush()
    if out_dir != source:  # the rest of the prepared directory (features.json, label names, ...) goes along
        for other in names:
            if other != "dataset_info.json" and not _SHARD.match(other) and storage.isfile(storage.join(source, other)):
                storage.copy_file(storage.join(source, other), storage.join(out_dir, other))
    info["fileFormat"] = "array_record"
    storage.write_text(storage.join(out_dir, "dataset_info.json"), json.dumps(info, indent=2))
    return counts
