"""Failures that name their file or key and a reason, with the exit status a script branches on:
config overrides and numeric ranges (exit 2), a corrupt .idx (DataFileError), and the floor
under train.nan_policy=skip (exit 1)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, read_metrics, run_train, train_env

from megatron_t2i.config import ConfigError, load_config, validate
from megatron_t2i.data.indexed import DataFileError, open_indexed, paths, write_indexed
from megatron_t2i.vocab import VocabLayout

# ---- config: override values and numeric ranges ----------------------------------------------


@pytest.mark.parametrize("item", ["optim.lr=[1e-3", "model.freeze={attention", "train.seed=: x"])
def test_override_value_that_is_not_yaml_names_the_key(item: str) -> None:
    key = item.split("=")[0]
    with pytest.raises(ConfigError, match=rf"override {key}: .* is not a valid YAML value") as e:
        load_config(None, [item])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("item", [
    "optim.lr=-1", "optim.min_lr=-1e-5", "optim.adam_beta1=1.0", "optim.adam_beta2=-0.1",
    "optim.adam_eps=0", "optim.weight_decay=-0.1", "optim.clip_grad=-1", "optim.lr=.nan",
    "model.hidden_dropout=1.5", "model.attention_dropout=-0.1", "model.norm_epsilon=0",
    "model.init_method_std=0", "model.ffn_hidden_size=0", "train.eval_interval=0",
    "train.exit_interval=-5", "checkpoint.save_interval=0", "train.eval_iters=0",
    "train.max_consecutive_skips=0", "data.caption_dropout=1", "optim.lr_decay_iters=0",
    "parallel.distributed_timeout_minutes=0", "logging.peak_tflops_per_gpu=0",
])
def test_out_of_range_values_name_the_key(item: str) -> None:
    key = item.split("=")[0]
    cfg = load_config(REPO / "configs/demo.yaml", [item])
    with pytest.raises(ConfigError, match=rf"^{key}=.* is outside [\[(]"):
        validate(cfg, world_size=1)


@pytest.mark.parametrize("items, message", [
    (["optim.lr=1e-4", "optim.min_lr=1e-3"], "optim.min_lr=0.001 is above optim.lr=0.0001"),
    (["optim.lr_warmup_iters=200", "optim.lr_decay_iters=100"],
     "optim.lr_warmup_iters=200 is above optim.lr_decay_iters=100"),
])
def test_related_values(items: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(load_config(REPO / "configs/demo.yaml", items), world_size=1)


def test_boundary_values_are_accepted() -> None:
    """Null intervals, zero weight decay / clip / dropout, lr 0 (evaluation-only runs), and a
    short run that stops inside the warmup (benchmarks)."""
    cfg = load_config(REPO / "configs/demo.yaml", [
        "optim.lr=0", "optim.min_lr=0", "optim.weight_decay=0", "optim.clip_grad=0",
        "optim.adam_beta1=0", "model.hidden_dropout=0", "train.eval_interval=null",
        "checkpoint.save_interval=null", "optim.lr_warmup_iters=100", "train.train_iters=10"])
    validate(cfg, world_size=1)


@pytest.mark.parametrize("item, message", [
    ("optim.lr=[1e-3", "config error: override optim.lr: '[1e-3' is not a valid YAML value"),
    ("optim.lr=-1", "config error: optim.lr=-1.0 is outside [0, inf)"),
])
def test_cli_exits_2_with_one_line(item: str, message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "megatron_t2i.train", "--config",
                           str(REPO / "configs/demo.yaml"), item], cwd=REPO, env=train_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr


# ---- a corrupt .idx --------------------------------------------------------------------------

LAYOUT = VocabLayout(text_size=16, image_size=8, bos_id=1, eod_id=2, text_pad_id=3)
HEAD = 34  # magic, version, dtype code, sequence count, document count
SEQUENCES = 3  # the tiny files below: lengths (int32 x 3), pointers (int64 x 3), documents


def _tiny(tmp_path: Path) -> Path:
    prefix = tmp_path / "tiny"
    write_indexed(prefix, [[1, 4, 5, 2], [1, 6, 2], [1, 7, 8, 9, 2]], LAYOUT)
    return prefix


def _patch(prefix: Path, offset: int, value: int, dtype: type) -> None:
    idx = paths(prefix)["idx"]
    data = bytearray(idx.read_bytes())
    item = np.array([value], dtype=dtype).tobytes()
    data[offset:offset + len(item)] = item
    idx.write_bytes(bytes(data))


POINTERS = HEAD + SEQUENCES * 4
DOCUMENTS = POINTERS + SEQUENCES * 8


@pytest.mark.parametrize("offset, value, dtype, message", [
    (POINTERS + 8, 1 << 40, np.int64, "sequence pointers are not increasing"),
    (POINTERS + 16, 40, np.int64, r"sequence 2 spans bytes 40-60, outside the 48-byte .bin"),
    (POINTERS, -8, np.int64, "sequence 0 spans bytes -8-8"),
    (HEAD + 4, -3, np.int32, "sequence 1 has a negative length -3"),
    (DOCUMENTS + 24, 7, np.int64, "document indices must run from 0 to the 3 sequences, found 0..7"),
    (DOCUMENTS, 5, np.int64, "document indices must run from 0"),
])
def test_garbage_index_raises_data_file_error(tmp_path: Path, offset: int, value: int,
                                              dtype: type, message: str) -> None:
    prefix = _tiny(tmp_path)
    assert len(open_indexed(prefix, LAYOUT)) == SEQUENCES
    _patch(prefix, offset, value, dtype)
    if "negative length" in message:  # keep the .bin size check satisfied
        _patch(prefix, HEAD + 8, 5 + 3 + 3, np.int32)
    with pytest.raises(DataFileError, match=rf"tiny\.idx: {message}"):
        open_indexed(prefix, LAYOUT)


def test_decreasing_document_indices(tmp_path: Path) -> None:
    prefix = tmp_path / "many"
    write_indexed(prefix, [[1, 2]] * 4, LAYOUT)  # document indices 0 1 2 3 4
    _patch(prefix, HEAD + 4 * 12 + 2 * 8, 0, np.int64)  # 0 1 0 3 4
    with pytest.raises(DataFileError, match=r"many\.idx: document indices are not increasing "
                                            r"\(document 2 starts at sequence 0"):
        open_indexed(prefix, LAYOUT)


# ---- a floor under train.nan_policy=skip ----------------------------------------------------

def test_consecutive_skips_stop_the_run(tmp_path: Path, corpus_dir: Path) -> None:
    """optim.lr=1e30 diverges at the second step; skipping from then on hits the floor of 2."""
    proc = run_train(tmp_path, corpus_dir, check=False, overrides=[
        "optim.lr=1e30", "train.train_iters=6", "train.nan_policy=skip",
        "train.max_consecutive_skips=2", "checkpoint.save_at_end=true"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert ("non-finite gradients at iteration 3 with a finite loss (the batch starts at "
            "consumed sample 16); 2 updates in a row were skipped (train.max_consecutive_skips"
            "=2), which ended the run: resume from the last checkpoint") in proc.stderr
    assert "Traceback" not in proc.stderr
    records = read_metrics(tmp_path)
    assert [(r["skipped"], r["skips_in_a_row"], r["skips_total"]) for r in records] == [
        (0, 0, 0), (1, 1, 1), (1, 2, 2)]
    assert "skipped 2 in a row | 2 in all" in proc.stdout
    assert not (tmp_path / "checkpoints" / "latest").exists()  # the diverged state is not saved


# ---- a full disk during a save ----------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 5 MiB filesystem (tmpfs): room for one tiny checkpoint (3.5 MB), not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_disk_full_during_a_save_names_the_folder(tmp_path: Path, corpus_dir: Path,
                                                  small_disk: Path, async_save: bool) -> None:
    """Asynchronous: the writer's failure surfaces when the save is finalized, as the same line."""
    checkpoints = small_disk / "checkpoints"
    proc = run_train(tmp_path / "run", corpus_dir, check=False, overrides=[
        "train.train_iters=2", "checkpoint.save_interval=1", f"checkpoint.dir={checkpoints}",
        f"checkpoint.async_save={str(async_save).lower()}"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: no space left on device while writing "
                           f"{checkpoints / 'iter_0000002.tmp'} ("), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert (checkpoints / "latest").read_text().strip() == "1"  # the last complete save
    assert (checkpoints / "iter_0000001" / "meta.json").exists()


def test_zip_writer_short_write_on_a_full_disk_is_named(small_disk: Path) -> None:
    """torch.save's own report of a full disk (the issue's `inline_container.cc ... unexpected
    pos`) maps to the same message; the same error on a disk with room does not."""
    import torch

    from megatron_t2i.checkpoint.layout import disk_full_error

    folder = small_disk / "iter_0000003.tmp"
    folder.mkdir()
    with pytest.raises(RuntimeError, match="unexpected pos") as raised:
        torch.save({"w": torch.zeros(2_000_000)}, folder / "common.pt")  # 8 MB on 5 MiB
    error = disk_full_error(raised.value, folder, small_disk)
    assert str(error).startswith(f"no space left on device while writing {folder} (")
    assert disk_full_error(raised.value, Path.cwd(), Path.cwd()) is None  # plenty of room


# ---- no orphaned checkpoint writers ----------------------------------------------------------

def _processes_with(marker: str) -> list[str]:
    """Processes whose environment holds `marker` (what is left of a job), as `pid cmdline`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "environ").read_bytes().split(b"\0"):
                found.append(f"{proc.name} {(proc / 'cmdline').read_bytes()[:120]!r}")
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def test_rank_killed_mid_save_leaves_no_writer_process(tmp_path: Path, corpus_dir: Path) -> None:
    """The rank is SIGKILLed while megatron-core writes shards (0.16: its forked writers and
    results-queue Manager, which go with it; before, both lived on, holding the output pipes;
    0.17+: the rank's own writer threads): nothing of the job is left, `latest` stays."""
    marker = f"T2I_ORPHAN_TEST={tmp_path}"
    env = train_env(MEGATRON_T2I_KILL_AT="writer@2", T2I_ORPHAN_TEST=str(tmp_path))
    proc = run_train(tmp_path, corpus_dir, check=False, env=env, timeout=120, overrides=[
        "train.train_iters=3", "checkpoint.save_interval=1"],
        script=REPO / "tests/scripts/train_with_fault.py")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "1"
    assert (tmp_path / "checkpoints" / "iter_0000002.tmp").exists()  # killed mid-save
    deadline = time.monotonic() + 10  # the kernel delivers the parent-death signal at once
    while (left := _processes_with(marker.encode())) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, left


def test_rank_killed_during_async_save_leaves_no_writer_process(tmp_path: Path,
                                                                corpus_dir: Path) -> None:
    """checkpoint.async_save: the rank is SIGKILLed while its asynchronous writer (slowed by
    the wrapper) runs; the writer, its own forked writers and the results-queue Manager go with
    it, and `latest` stays on the previous save."""
    marker = f"T2I_ORPHAN_TEST={tmp_path}"
    env = train_env(MEGATRON_T2I_KILL_AT="asyncrank@2", T2I_ORPHAN_TEST=str(tmp_path))
    proc = run_train(tmp_path, corpus_dir, check=False, env=env, timeout=120, overrides=[
        "train.train_iters=3", "checkpoint.save_interval=1", "checkpoint.async_save=true"],
        script=REPO / "tests/scripts/train_with_fault.py")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "1"
    assert (tmp_path / "checkpoints" / "iter_0000002.tmp").exists()  # killed mid-save
    deadline = time.monotonic() + 10
    while (left := _processes_with(marker.encode())) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, left
