"""The on-disk layout of a checkpoint root: the one owner of folders, `latest` and meta.json.

    <checkpoint dir>/
        iter_0000100/          one folder per save, whatever the engine wrote into it
            meta.json          iteration, consumed samples, config, vocabulary layout, padded
                               vocab size, engine and parallel layout (plain JSON)
            manifest.json      size and checksum of every file (checkpoint/integrity.py)
            ...                the engine's own files (megatron-core dist_checkpointing,
                               DeepSpeed ZeRO partitions)
        latest                 the iteration of the newest *complete* save

A save is published only once complete: every rank writes into `iter_N.tmp/` (`begin_save`),
then rank 0 writes meta.json and the manifest, renames the folder to `iter_N/` and only then
rewrites `latest` atomically (`publish_save`). A job killed at any point leaves `latest` on the
previous complete checkpoint. Tools (import, surgery, export) write a whole folder through
`staged_output`. Every error about a checkpoint is a `CheckpointError` naming the file.
Reading untrusted files safely is checkpoint/trust.py's job (`check_before_load`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
from megatron.core import parallel_state
from torch.distributed.checkpoint.api import CheckpointException

from megatron_t2i.checkpoint.integrity import write_manifest
from megatron_t2i.files import publish_folder, staged_folder, write_text_atomic
from megatron_t2i.platform import megatron_core_0_17_or_later, megatron_core_release

META_FILE = "meta.json"
LATEST_FILE = "latest"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, or input a checkpoint tool cannot use; the message
    names the file and what is wrong."""


# What bad input makes the tools' libraries raise (torch.load, safetensors, json, DCP): each
# is reported as one `error: FILE: what is wrong` line, exit 1 (tool_error).
TOOL_INPUT_ERRORS = (CheckpointError, OSError, ValueError, RuntimeError, KeyError,
                     EOFError, pickle.UnpicklingError)


def reason(err: BaseException) -> str:
    """One line saying why a library refused a file. torch's weights_only refusal spends its
    first paragraph on advice (load with weights_only=False: exactly what must not be done
    with an untrusted file); the line that says what it found comes after."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Weights only load failed"):
        return f"refused by torch.load(weights_only=True): {lines[1]}"
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def tool_error(err: BaseException, source: str) -> int:
    """Print `err` as the one line a command-line tool reports; returns the exit status 1.
    A CheckpointError names its file already; anything else is prefixed with `source`."""
    if isinstance(err, CheckpointError):
        text = " ".join(str(err).split())  # a message quoting DCP may span several lines
    else:
        text = f"{source}: {reason(err)}"
    print(f"error: {text}", file=sys.stderr, flush=True)
    return 1



@dataclass
class TrainState:
    """What a checkpoint carries besides tensors."""

    iteration: int
    consumed_samples: int


def iteration_dir(root: Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def read_latest(root: Path) -> int | None:
    """The iteration of the newest complete checkpoint under root, or None."""
    marker = Path(root) / LATEST_FILE
    if not marker.exists():
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{marker}: expected an iteration number, found {text!r}")
    iteration = int(text)
    folder = iteration_dir(root, iteration)
    if not (folder / META_FILE).exists():
        raise CheckpointError(f"{marker} names iteration {iteration} but {folder}/{META_FILE} "
                              f"is missing: the checkpoint folder is incomplete or was removed")
    return iteration


def write_latest(root: Path, iteration: int) -> None:
    write_text_atomic(Path(root) / LATEST_FILE, f"{iteration}\n")


def resolve_folder(path: str | Path) -> Path:
    """The `iter_NNNNNNN` folder a path names: itself, or the newest complete one under a
    checkpoint root (the one its `latest` names)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if (path / META_FILE).exists() or path.name.startswith("iter_"):
        return path
    iteration = read_latest(path)
    if iteration is None:
        raise CheckpointError(f"{path} is not a checkpoint: it has neither {META_FILE} (an "
                              f"iter_NNNNNNN folder) nor a `{LATEST_FILE}` file (a checkpoint "
                              f"root)")
    return iteration_dir(path, iteration)


def read_meta(folder: Path) -> dict[str, Any]:
    path = Path(folder) / META_FILE
    if not path.exists():
        raise CheckpointError(f"{folder} is not a megatron_t2i checkpoint: no {META_FILE}")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def check_core_format(folder: Path) -> None:
    """megatron-core 0.17+ keeps a checkpoint's common state inside the torch_dist files and
    writes no common.pt; 0.16.x reads only common.pt and fails deep inside its loader."""
    if (folder / "common.pt").is_file() or megatron_core_0_17_or_later():
        return
    raise CheckpointError(f"{folder}: written by megatron-core 0.17 or later (it has no "
                          f"common.pt); megatron-core {megatron_core_release()} cannot load it: "
                          "install megatron-core >=0.17,<0.20 (docs/platform.md)")


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    write_text_atomic(Path(folder) / META_FILE, json.dumps(meta, indent=2) + "\n")


def parallel_layout() -> dict[str, int]:
    """The TP / PP / VPP / DP sizes of this process's run, as recorded in meta.json."""
    return {
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline_model_parallel_size":
            parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1,
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
    }


# ---- a save by every rank of a job, published once complete ---------------------------------

def _tmp_dir(root: Path, iteration: int) -> Path:
    final = iteration_dir(root, iteration)
    return final.with_name(final.name + ".tmp")


def begin_save(root: Path, iteration: int) -> Path:
    """Collective: an empty `iter_N.tmp/` for every rank to write its part of a save into
    (one left by a killed save is removed first)."""
    tmp = _tmp_dir(root, iteration)
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    return tmp


def publish_save(root: Path, state: TrainState, meta: dict[str, Any]) -> Path:
    """Collective, once every rank has written its part into `iter_N.tmp/`: rank 0 writes
    meta.json and the manifest, renames the folder to `iter_N/` and only then rewrites
    `latest`."""
    dist.barrier()
    final = iteration_dir(root, state.iteration)
    if dist.get_rank() == 0:
        tmp = _tmp_dir(root, state.iteration)
        write_meta(tmp, dict(meta, iteration=state.iteration,
                             consumed_samples=state.consumed_samples, parallel=parallel_layout()))
        write_manifest(tmp)  # sizes and checksums of every file, verified on load
        publish_folder(tmp, final)
        write_latest(root, state.iteration)
    dist.barrier()
    return final


def publish_checkpoint(root: Path, state: TrainState, meta: dict[str, Any],
                       write: Callable[[Path], dict[str, Any]]) -> Path:
    """Collective, a whole save: `write` puts this rank's part (an engine's state) into
    `iter_N.tmp/` and returns what meta.json adds about it; then `publish_save`. A full disk
    becomes a one-line CheckpointError, and `latest` stays on the last complete save."""
    tmp = begin_save(root, state.iteration)
    with full_disk_reported(tmp, root):
        written = write(tmp)
    return publish_save(root, state, dict(meta, **written))


@contextlib.contextmanager
def full_disk_reported(tmp: Path, root: Path) -> Iterator[None]:
    """Around the writing of `tmp` (a save under `root`): a full disk, however megatron-core's
    writers or torch's zip writer report it, becomes one CheckpointError line."""
    try:
        yield
    except (Exception, CheckpointException) as e:  # the latter is a BaseException
        full = disk_full_error(e, tmp, root)
        if full is None:
            raise
        raise full from None


# What a full disk looks like once it has come through megatron-core's writer processes and
# torch's zip writer: an errno in a message, or the zip writer's check of a short write.
_ENOSPC_TEXT = (os.strerror(errno.ENOSPC), f"[Errno {errno.ENOSPC}]")
_SHORT_WRITE_TEXT = "unexpected pos"
# megatron-core 0.17+ re-raises a failed writer process without its cause (the short write is
# only printed by the worker): on a nearly full filesystem that failure is the full disk.
_WORKER_FAILURE_TEXT = "Worker failure"
_NEARLY_FULL_BYTES = 64 * 2**20


def disk_full_error(error: BaseException, folder: Path, root: Path) -> CheckpointError | None:
    """A one-line CheckpointError when `error` (raised while writing `folder`) was a full disk,
    else None. A short write of the zip writer counts when the filesystem is nearly full."""
    text = " ".join(str(e) for e in _exception_chain(error))
    free = shutil.disk_usage(folder if folder.exists() else root).free
    short_write = (_SHORT_WRITE_TEXT in text or _WORKER_FAILURE_TEXT in text) \
        and free < _NEARLY_FULL_BYTES
    if not (short_write or any(t in text for t in _ENOSPC_TEXT)):
        return None
    return CheckpointError(f"no space left on device while writing {folder} ({free:,} bytes "
                           f"free there); {root / LATEST_FILE} still names the last complete "
                           f"checkpoint: free some space and resume")


def _exception_chain(error: BaseException | None) -> list[BaseException]:
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


# ---- a tool's output folder ----------------------------------------------------------------

@contextlib.contextmanager
def staged_output(target: str | Path, overwrite: bool = False,
                  sources: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; rename it into place once the body succeeds.

    A killed or failing tool leaves `target` as it was (a leftover `.<name>.tmp-*` folder at
    most). An existing target is refused unless `overwrite`; a target that is (or holds) one
    of the `sources` is always refused, so a source is never modified.
    """
    target = Path(target).absolute()
    for src in sources:
        src = Path(src).absolute()
        if target == src or target in src.parents or src in target.parents:
            raise CheckpointError(f"output {target} overlaps the source {src}; "
                                  f"write to another folder")
    if target.exists() and not overwrite:
        raise CheckpointError(f"{target} already exists; pass --overwrite to replace it")
    with staged_folder(target) as tmp:
        yield tmp
