"""tools/preprocess_data.py, killed with SIGKILL part-way (tests only): after
T2I_KILL_AFTER_SHARDS shards were committed, at the first chunk of the next shard, so that
shard is left partial. The production code has no hook for this: the wrapper swaps in its own
methods before running the tool's main."""

import importlib.util
import os
import signal
import sys
from pathlib import Path

from megatron_t2i.data import preprocess

REPO = Path(__file__).resolve().parents[2]
KILL_AFTER = int(os.environ["T2I_KILL_AFTER_SHARDS"])
_commit, _add_chunk = preprocess.ShardWriter.commit, preprocess.ShardWriter.add_chunk
committed = []


def commit(self):
    committed.append(self.name)
    return _commit(self)


def add_chunk(self, *args, **kwargs):
    _add_chunk(self, *args, **kwargs)
    if len(committed) >= KILL_AFTER:
        self.builder.data_file.flush()  # a partial shard on disk, as a real crash leaves it
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    preprocess.ShardWriter.commit, preprocess.ShardWriter.add_chunk = commit, add_chunk
    spec = importlib.util.spec_from_file_location("tool", REPO / "tools" / "preprocess_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    sys.exit(tool.main(sys.argv[1:]))
