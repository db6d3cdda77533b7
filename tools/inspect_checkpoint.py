"""Show what a trainer checkpoint holds: iteration, config, vocabulary, tensors, size.

    python tools/inspect_checkpoint.py CHECKPOINT [--json] [--no-optimizer]
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="checkpoint root (with `latest`) or iter_NNNNNNN folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-optimizer", action="store_true", help="hide optimizer tensors")
    args = p.parse_args(argv)

    from megatron_t2i.checkpoint.inspect import describe, format_report
    from megatron_t2i.checkpoint.layout import TOOL_INPUT_ERRORS, tool_error

    try:
        info = describe(args.checkpoint)
    except TOOL_INPUT_ERRORS as err:
        return tool_error(err, args.checkpoint)
    print(json.dumps(info, indent=2) if args.json
          else format_report(info, show_optimizer=not args.no_optimizer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
