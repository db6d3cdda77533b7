"""Metric sinks read back by their own readers: json lines, TensorBoard's EventAccumulator,
and the W&B offline run file decoded with wandb's protobuf Record."""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path

import pytest

from megatron_t2i.config import LoggingConfig
from megatron_t2i.timers import Stopwatch, TimedIterator
from megatron_t2i.training.metrics import MetricsLogger, Throughput, data_wait_fraction

TRAIN = {"loss": 5.25, "loss_text": 4.5, "loss_image": 6.0, "lr": 3e-4, "grad_norm": 1.5,
         "tokens_per_sec": 12345.0, "tflops_per_gpu": 45.6, "mfu": 0.046,
         "data_wait_fraction": 0.012}


def _read_jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_jsonl_holds_values_and_nonfinite_as_null(tmp_path, capsys):
    with MetricsLogger(tmp_path, LoggingConfig(tensorboard=False), {}, is_writer=True) as log:
        log.log(10, TRAIN)
        log.log(20, {"loss": float("nan"), "grad_norm": float("inf"), "skipped": 1})
        log.log_eval(20, {"loss": 5.0, "loss_image": 5.5})
    train1, train2, valid = _read_jsonl(tmp_path)
    assert train1["iteration"] == 10 and train1["split"] == "train"
    assert {k: train1[k] for k in TRAIN} == TRAIN
    assert train2["loss"] is None and train2["grad_norm"] is None and train2["skipped"] == 1
    assert valid == {**valid, "iteration": 20, "split": "valid", "loss": 5.0, "loss_image": 5.5}
    line = capsys.readouterr().out.splitlines()[0]
    for piece in ("iter      10", "loss 5.2500", "text 4.5000", "image 6.0000", "lr 3.000e-04",
                  "grad 1.500", "12,345 tok/s", "45.6 TFLOP/s", "MFU 4.6%", "data wait 1.2%"):
        assert piece in line


def test_resumed_logger_appends(tmp_path):
    for iteration in (1, 2):
        with MetricsLogger(tmp_path, LoggingConfig(tensorboard=False), {}, True) as log:
            log.log(iteration, {"loss": float(iteration)})
    assert [r["iteration"] for r in _read_jsonl(tmp_path)] == [1, 2]


def test_tensorboard_scalars_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, LoggingConfig(tensorboard=True), {}, True) as log:
        log.log(1, {"loss": 2.0, "lr": 1e-3})
        log.log(2, {"loss": 1.5, "lr": 1e-3})
        log.log_eval(2, {"loss": 1.75})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.0), (2, 1.5)]
    assert [(e.step, e.value) for e in events.Scalars("valid/loss")] == [(2, 1.75)]
    assert events.Scalars("train/lr")[0].value == pytest.approx(1e-3)


def test_non_writer_rank_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = LoggingConfig(tensorboard=True, wandb=True)
    with MetricsLogger(run_dir, cfg, {}, is_writer=False) as log:
        log.log(1, TRAIN)
        log.log_eval(1, TRAIN)
    assert not run_dir.exists()
    assert capsys.readouterr().out == ""


# ---- W&B offline -----------------------------------------------------------------------

def _wandb_records(path: Path) -> list:
    """Decode a `.wandb` run file: a LevelDB-style log (7-byte ":W&B" header, 32 KiB blocks,
    chunks of crc32 + length + type) of protobuf `Record`s. wandb 0.31 has no Python reader
    (its Go core writes the file), so this follows the format and lets wandb's own protobuf
    classes parse each record."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunk, records = 7, b"", []
    while pos + 7 <= len(data):
        left_in_block = 32768 - pos % 32768
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left_in_block < 7 or kind == 0:  # block trailer padding
            pos += left_in_block
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            records.append(Record.FromString(chunk))
            chunk = b""
    return records


def _wandb_run(run_file: Path) -> tuple[str, dict, list[dict]]:
    """(run id, config, history rows) of one offline run file."""
    run_id, config, history = "", {}, []
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in record.history.item})
    return run_id, config, history


def test_wandb_offline_run_holds_values_and_resumes_same_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"),
                       ("WANDB_CONFIG_DIR", str(tmp_path / "cfg")),
                       ("WANDB_CACHE_DIR", str(tmp_path / "cache")),
                       ("WANDB_DATA_DIR", str(tmp_path / "data"))):
        monkeypatch.setenv(var, value)
    run_dir = tmp_path / "run"
    cfg = LoggingConfig(tensorboard=False, wandb=True, wandb_name="demo", wandb_tags=["t2i"])
    full_config = {"model": {"hidden_size": 64}, "train": {"train_iters": 3}}
    with MetricsLogger(run_dir, cfg, full_config, True) as log:
        log.log(1, {"loss": 3.0, "lr": 1e-3})
        log.log(2, {"loss": float("nan"), "lr": 1e-3})
        log.log_eval(2, {"loss": 2.5})
    with MetricsLogger(run_dir, cfg, full_config, True) as log:  # the restarted job
        log.log(3, {"loss": 2.0, "lr": 5e-4})

    run_id = (run_dir / "wandb_run_id").read_text().strip()
    first, second = sorted((run_dir / "wandb").glob("offline-run-*"))
    id1, config, history1 = _wandb_run(next(first.glob("run-*.wandb")))
    id2, _, history2 = _wandb_run(next(second.glob("run-*.wandb")))
    assert id1 == id2 == run_id
    assert config["model"] == {"hidden_size": 64}
    rows = [(r["iteration"], r.get("train/loss"), r.get("valid/loss")) for r in history1]
    assert rows[0] == (1, 3.0, None)
    assert rows[1][0] == 2 and math.isnan(rows[1][1])
    assert rows[2] == (2, None, 2.5)
    assert [(r["iteration"], r["train/loss"], r["train/lr"]) for r in history2] == [(3, 2.0, 5e-4)]


# ---- throughput ----------------------------------------------------------------------------

def test_throughput_scalars():
    speed = Throughput(tokens_per_iteration=8 * 2048, flops_per_iteration=8 * 494.5e12,
                       world_size=8, peak_tflops_per_gpu=989.0)
    s = speed.scalars(iteration_time=2.0, data_wait_time=0.1)
    assert s["tokens_per_sec"] == 8 * 2048 / 2.0
    assert s["tflops_per_gpu"] == pytest.approx(247.25)
    assert s["mfu"] == pytest.approx(0.25)
    assert s["data_wait_fraction"] == pytest.approx(0.05)
    assert data_wait_fraction(1.0, 0.0) == 0.0


def test_timed_iterator_counts_wait_in_next():
    def slow():
        for item in range(2):
            time.sleep(0.02)
            yield item

    watch = Stopwatch()
    assert list(TimedIterator(slow(), watch)) == [0, 1]
    waited = watch.pop()
    assert 0.04 <= waited < 1.0
    assert watch.pop() == 0.0
