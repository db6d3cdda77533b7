"""What every evaluation tool does around its computation: user errors become one `error:`
line and exit status 1, process groups are torn down, and rank 0 alone reports."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megatron_t2i.checkpoint.layout import CheckpointError
from megatron_t2i.eval import loading

USER_ERRORS = (ValueError, KeyError, FileNotFoundError, CheckpointError)


def print_report(report: dict[str, Any], out: str | None) -> None:
    """The JSON report on stdout, and in `out` when given."""
    text = json.dumps(report, indent=2)
    print(text, flush=True)
    if out:
        Path(out).write_text(text + "\n")


def run_tool(compute: Callable[[], dict[str, Any]], emit: Callable[[dict[str, Any]], None],
             distributed: bool = True) -> int:
    """compute() on every rank; emit(report) on rank 0 after the groups (if any) are gone."""
    try:
        report = compute()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if distributed:
            loading.close()
    if not distributed or loading.is_writer():
        emit(report)
    return 0
