"""TFRecord-format TFDS datasets: ``maskjax data convert`` turns one into array_record without TensorFlow.

The TFRecord dataset is made here from the prepared embedded digits: the same dataset directory, each
array_record shard's records written as a TFRecord file by tensorboardX's record writer (the framing
TensorBoard's event files use, an implementation independent of ours) and ``fileFormat: tfrecord``, which
is what ``tfds build`` without ``--file_format`` leaves. Grain's TFRecord reader cross-checks ours."""
import json
import os
import shutil

import pytest

from maskjax import cli, train
from maskjax.data import convert, sources
from tests.conftest import load_config

NAME = "maskjax_digits"


def array_records(path):
    from array_record.python import array_record_data_source

    source = array_record_data_source.ArrayRecordDataSource([path])
    return [source[i] for i in range(len(source))]


def as_tfrecord_dataset(data_dir, tmp_path):
    """A copy of the prepared digits dataset in TFRecord format; returns its data_dir."""
    from tensorboardX.record_writer import RecordWriter

    version = convert.find(NAME, data_dir)
    target = tmp_path / "tfrecord_data" / NAME / os.path.basename(version)
    shutil.copytree(version, target, ignore=shutil.ignore_patterns("*.array_record-*"))
    for name in os.listdir(version):
        if ".array_record-" in name:
            writer = RecordWriter(str(target / name.replace(".array_record-", ".tfrecord-")))
            for record in array_records(os.path.join(version, name)):
                writer.write(record)
            writer.close()
    info = json.loads((target / "dataset_info.json").read_text())
    info["fileFormat"] = "tfrecord"
    (target / "dataset_info.json").write_text(json.dumps(info))
    return str(tmp_path / "tfrecord_data")


@pytest.mark.slow
def test_a_tfrecord_dataset_is_converted_and_trains_like_the_original(data_dir, tmp_path, capsys):
    import grain.experimental

    tf_dir = as_tfrecord_dataset(data_dir, tmp_path)
    config = load_config("mae_digits.py:tiny", "total_steps=3", "log_every=1", data_dir=tf_dir)
    with pytest.raises(sources.DataError, match="maskjax data convert --name maskjax_digits"):
        sources.source(config.data, "train")

    version = convert.find(NAME, tf_dir)
    shards = sorted(n for n in os.listdir(version) if ".tfrecord-" in n)
    assert shards
    for shard in shards:  # our reader (with CRCs) = Grain's reader (without)
        ours = list(convert.tfrecords(os.path.join(version, shard)))
        assert ours == list(grain.experimental.TFRecordIterDataset(os.path.join(version, shard)))

    assert cli.main(["data", "convert", "--name", NAME, "--data_dir", tf_dir]) == 0
    info = json.loads(open(os.path.join(version, "dataset_info.json")).read())
    splits = {s["name"]: sum(int(n) for n in s["shardLengths"]) for s in info["splits"]}
    assert f"train {splits['train']} examples" in capsys.readouterr().out
    original = convert.find(NAME, data_dir)
    for name in sorted(os.listdir(original)):
        if ".array_record-" in name:  # byte for byte the records TFDS wrote
            assert array_records(os.path.join(version, name)) == array_records(os.path.join(original, name))

    got = train.train(config, str(tmp_path / "converted"), evaluate=False, quiet=True)["losses"]
    want = train.train(load_config("mae_digits.py:tiny", "total_steps=3", "log_every=1", data_dir=data_dir),
                       str(tmp_path / "original"), evaluate=False, quiet=True)["losses"]
    assert got == want and len(got) == 3

    # converting again is refused by name; so is a damaged file
    assert cli.main(["data", "convert", "--name", NAME, "--data_dir", tf_dir]) == 2
    assert "is in 'array_record' format, not TFRecord" in capsys.readouterr().err


def test_a_damaged_tfrecord_file_is_named_with_the_byte_offset(tmp_path):
    from tensorboardX.record_writer import RecordWriter

    path = str(tmp_path / "x.tfrecord-00000-of-00001")
    writer = RecordWriter(path)
    for record in (b"first", b"second record", b"third"):
        writer.write(record)
    writer.close()
    assert list(convert.tfrecords(path)) == [b"first", b"second record", b"third"]
    data = bytearray(open(path, "rb").read())
    data[21 + 12 + 3] ^= 1  # a bit of the second record's bytes (the first takes 12 + 5 + 4)
    open(path, "wb").write(bytes(data))
    with pytest.raises(sources.DataError, match=r"x\.tfrecord-00000-of-00001: the record at byte 21 fails its CRC"):
        list(convert.tfrecords(path))
    open(path, "wb").write(bytes(data[:21 + 12 + 4]))
    with pytest.raises(sources.DataError, match="record at byte 21 is cut short"):
        list(convert.tfrecords(path))
    with pytest.raises(sources.DataError, match="is not prepared in"):
        convert.find("nothing_here", str(tmp_path))
