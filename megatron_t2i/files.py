"""Writing files and folders so that readers see them whole or not at all.

The one place that does write-to-temporary-then-rename: a small file (`write_text_atomic`), a
folder built in a temporary sibling and renamed into place (`publish_folder`,
`staged_folder`). A job killed at any point leaves the previous content (or nothing) plus at
most a leftover temporary beside it, never a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text`: written to a temporary sibling, synced, then renamed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from other users
        publish_file(Path(tmp), path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def publish_file(tmp: str | Path, target: str | Path) -> None:
    """Rename the finished file `tmp` (written by any writer) to `target`, its bytes on disk
    first and the rename after."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)
    sync_folder_entry(Path(target).parent)


def sync_folder_entry(folder: Path) -> None:
    """The folder's own entry list on disk (after a rename into it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(folder: Path) -> None:
    """Every file directly under `folder`, and the folder itself, on disk."""
    for path in sorted(folder.iterdir()):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    sync_folder_entry(folder)


def publish_folder(tmp: Path, target: Path, replace: bool = True) -> None:
    """Rename the finished folder `tmp` to `target`. An existing `target` is replaced when
    `replace` (moved aside first, so a kill between the renames leaves one of the two whole);
    otherwise the rename fails with OSError, e.g. when another process published first."""
    if target.exists() and replace:
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
    sync_folder_entry(target.parent)


@contextlib.contextmanager
def staged_folder(target: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; publish it as `target` once the body
    succeeds. A failing or killed body leaves `target` as it was."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared folder from other users
        publish_folder(tmp, target, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
