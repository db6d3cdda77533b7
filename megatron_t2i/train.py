"""Training entry point.

    python -m megatron_t2i.train --config configs/demo.yaml [section.key=value ...]
    torchrun --nproc_per_node 2 -m megatron_t2i.train --config configs/demo.yaml
    t2i-train --config ...   (the same, as a console script)

The configuration is validated against the launch's world size before any process group
starts; a bad config exits with status 2 and a message naming the key. Exit status 75 means
stopped on SIGTERM/SIGUSR1 with a checkpoint saved (run again to resume); 1 an error.
"""

from __future__ import annotations

import argparse
import sys

from megatron_t2i.config import ConfigError, load_config, validate, world_size_from_env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="t2i-train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    # DeepSpeed's launcher appends --local_rank=N; the rank comes from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, world_size_from_env())
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from megatron_t2i.checkpoint.layout import CheckpointError
    from megatron_t2i.data.indexed import DataFileError
    from megatron_t2i.training import faults  # exit codes: see training/faults.py
    from megatron_t2i.training.trainer import run  # heavy imports after validation
    from megatron_t2i.vocab import VocabMismatchError

    try:
        run(cfg)
    except faults.Preempted:
        faults.record_preempted()  # for megatron_t2i.torchrun
        return faults.PREEMPTED_EXIT_CODE  # the trainer said why; a restart resumes
    except (CheckpointError, VocabMismatchError, DataFileError, FileNotFoundError,
            faults.NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except RuntimeError as e:
        if not faults.is_collective_timeout(e):
            raise
        print(f"error: a collective did not complete within parallel.distributed_timeout_"
              f"minutes={cfg.parallel.distributed_timeout_minutes}: another rank is hung or "
              f"dead ({e})", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
