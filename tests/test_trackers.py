"""--log_to: TensorBoard, wandb (offline) and SwanLab (local) get the numbers of metrics.jsonl at the same
steps, read back with each one's own reader or record format; a missing package is one line."""
import glob
import json
import os
import struct
import subprocess
import sys

import pytest
from conftest import metrics, run_ok
from conftest import pretrain_command as command

from babyllama.errors import UsageError
from babyllama.trackers import open_trackers


def leveldb_log_records(path: str) -> list[bytes]:
    """The records of a file in LevelDB's log format, which wandb's .wandb and SwanLab's .swanlab files
    use (a 7-byte file header, then 32 KiB blocks of records that may span blocks)."""
    with open(path, "rb") as f:
        data = f.read()
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # a whole record, or the first part of one
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            records.append(pending)
    return records


@pytest.fixture(scope="module")
def tracked_run(corpus, small_tokenizer, tmp_path_factory):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    pytest.importorskip("swanlab")
    out = tmp_path_factory.mktemp("tracked") / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "SWANLAB_MODE")}
    run_ok(command(corpus, small_tokenizer, out, "--max_steps=4", "--log_interval=1", "--eval_interval=2",
                   "--log_to=tensorboard,wandb,swanlab"), env=env, timeout=300)
    expected: dict[str, dict[int, float]] = {}
    for record in metrics(out):
        for key, value in record.items():
            if key != "step":
                expected.setdefault(key, {})[record["step"]] = float(value)
    return out, expected


def test_tensorboard_reads_the_metrics(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, expected = tracked_run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(expected)
    for key, by_step in expected.items():
        assert {e.step: e.value for e in events.Scalars(key)} == pytest.approx(by_step, rel=1e-6)
    assert "settings/text_summary" in events.Tags()["tensors"]


def test_wandb_offline_run_has_the_history_and_settings(tracked_run):
    from wandb.proto import wandb_internal_pb2
    out, expected = tracked_run
    (path,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    history: dict[str, dict[int, float]] = {}
    settings = {}
    for data in leveldb_log_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):  # wandb's own: _step, _timestamp, _runtime
                    history.setdefault(key, {})[record.history.step.num] = json.loads(item.value_json)
        elif record.WhichOneof("record_type") in ("run", "config"):  # the settings come with the run's start
            updates = (record.run.config if record.WhichOneof("record_type") == "run" else record.config).update
            settings.update({item.key: json.loads(item.value_json) for item in updates})
    assert history == expected
    assert settings["parameters"] > 0 and settings["stage"] == "pretrain" and settings["max_steps"] == 4


def test_swanlab_local_run_has_the_history_and_settings(tracked_run):
    from swanlab.proto.swanlab.record.v1 import record_pb2
    out, expected = tracked_run
    (path,) = glob.glob(str(out / "swanlog" / "run-*" / "run-*.swanlab"))
    history: dict[str, dict[int, float]] = {}
    for data in leveldb_log_records(path):
        record = record_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "scalar":
            history.setdefault(record.scalar.key, {})[record.scalar.step] = record.scalar.value.number
    assert history == expected
    (config,) = glob.glob(str(out / "swanlog" / "run-*" / "files" / "config.yaml"))
    assert "parameters:" in open(config, encoding="utf-8").read()


def test_a_missing_tracker_package_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(UsageError, match=r"^--log_to=wandb needs the wandb package: pip install wandb"):
        open_trackers("tensorboard,wandb", str(tmp_path), "run", {}, master=False)


def test_an_unknown_tracker_is_one_line(corpus, small_tokenizer, tmp_path):
    result = subprocess.run(command(corpus, small_tokenizer, tmp_path, "--log_to=tensorboard,mlflow"),
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--log_to" in result.stderr and "tensorboard, wandb, swanlab" in result.stderr
