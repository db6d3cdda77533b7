"""Shard set vs merged file: the cost of merging, and of reading either (prints figures).

    python tools/bench_shards.py --root /tmp/shardbench --documents 500000 --shards 64

Writes a synthetic corpus of paper-shaped documents (a caption of 20-40 text ids, <boi>,
1,024 image codes, <eoi>; int32) as a shard set exactly as preprocessing leaves it, then, each
phase in a fresh process: (a) `merge_indexed` into one file; (b) open the shard set and read
every document once in a shuffled order; (c) the same over the merged file. Per phase: wall
time, peak resident memory (VmHWM, which counts the mapped file pages read) and peak
anonymous memory (RssAnon, the process's own; `anon_at_start_mib` is what the imports hold). `--keep` leaves the corpus; by default the
root folder is deleted at the end. Figures: docs/data-at-scale.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

CODES, CAPTION = 1024, (20, 41)


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class PeakAnon:
    """The largest RssAnon seen, polled every 20 ms while the phase runs."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kib("RssAnon"))
            time.sleep(0.02)

    def __enter__(self) -> PeakAnon:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_kib("RssAnon"))


def _layout():
    from megatron_t2i.vocab import VocabLayout
    return VocabLayout(text_size=50_432, image_size=16_384, bos_id=1, eod_id=2, text_pad_id=0)


def write_corpus(root: Path, documents: int, shards: int) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_t2i.data.indexed import paths, write_sidecar
    from megatron_t2i.data.shards import write_manifest

    layout, rng = _layout(), np.random.default_rng(0)
    folder = root / "set.shards"
    folder.mkdir(parents=True)
    prefixes, tokens = [], 0
    for task, n in enumerate(np.diff(np.linspace(0, documents, shards + 1).astype(int))):
        prefix = folder / f"{task:06d}"
        builder = IndexedDatasetBuilder(str(paths(prefix)["bin"]), dtype=np.int32)
        captions = rng.integers(*CAPTION, n)
        text = rng.integers(3, 50_000, int(captions.sum()), dtype=np.int32)
        codes = rng.integers(0, 16_384, (n, CODES), dtype=np.int32) + layout.image_start
        ends = np.cumsum(captions)
        for d in range(n):  # [bos] caption [boi] codes [eoi]
            doc = np.concatenate([[layout.bos_id], text[ends[d] - captions[d]:ends[d]],
                                  [layout.boi_id], codes[d], [layout.eoi_id]]).astype(np.int32)
            builder.add_document(doc, [doc.size])
            tokens += doc.size
        builder.finalize(str(paths(prefix)["idx"]))
        prefixes.append(prefix)
    write_manifest(root / "set", prefixes)
    write_sidecar(root / "set", layout, {"mode": "conditional"}, documents, tokens,
                  (0, layout.specials_start + 1))


def merge(root: Path) -> dict:
    from megatron_t2i.data.indexed import merge_indexed, read_sidecar
    from megatron_t2i.data.shards import read_manifest

    entries, side = read_manifest(root / "set"), read_sidecar(root / "set")
    documents, tokens = merge_indexed(root / "merged", [e.prefix for e in entries], _layout(),
                                      {"mode": side["mode"]}, tuple(side["id_range"]))
    return {"documents": documents, "tokens": tokens}


def read_all(root: Path, name: str) -> dict:
    """Open (with every check training runs) and read each document once, shuffled."""
    from megatron_t2i.data.indexed import open_indexed

    t0 = time.perf_counter()
    indexed = open_indexed(root / name, _layout())
    opened = time.perf_counter() - t0
    checksum = 0
    for i in np.random.default_rng(1).permutation(len(indexed)):
        checksum += int(indexed[int(i)].sum(dtype=np.int64))  # touches every token
    return {"open_s": round(opened, 3), "documents": len(indexed), "checksum": checksum}


PHASES = {"write": lambda root, a: write_corpus(root, a.documents, a.shards),
          "merge": lambda root, a: merge(root),
          "read-shards": lambda root, a: read_all(root, "set"),
          "read-merged": lambda root, a: read_all(root, "merged")}


def run_phase(args: argparse.Namespace) -> None:
    import megatron_t2i.data.indexed  # noqa: F401  (imports are not part of a phase's time)

    start_anon, t0 = _status_kib("RssAnon"), time.perf_counter()
    with PeakAnon() as anon:
        result = PHASES[args.phase](Path(args.root), args) or {}
    result.update(phase=args.phase, seconds=round(time.perf_counter() - t0, 2),
                  peak_rss_mib=round(_status_kib("VmHWM") / 1024, 1),
                  peak_anon_mib=round(anon.peak / 1024, 1),
                  anon_at_start_mib=round(start_anon / 1024, 1))
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/shardbench")
    ap.add_argument("--documents", type=int, default=500_000)
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--keep", action="store_true", help="leave the corpus in --root")
    ap.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        return run_phase(args)
    root = Path(args.root)
    if root.exists():
        sys.exit(f"bench_shards: {root} exists; pass another --root or remove it")
    results = {}
    try:
        for phase in PHASES:
            out = subprocess.run([sys.executable, __file__, "--phase", phase, "--root", str(root),
                                  "--documents", str(args.documents), "--shards", str(args.shards)],
                                 check=True, capture_output=True, text=True).stdout
            results[phase] = json.loads(out.strip().splitlines()[-1])
            print(json.dumps(results[phase]), flush=True)
        gib = sum(f.stat().st_size for f in (root / "set.shards").glob("*.bin")) / 2**30
        print(f"corpus: {args.documents:,} documents, {gib:.2f} GiB of tokens in {args.shards} "
              f"shards; samples equal: "
              f"{results['read-shards']['checksum'] == results['read-merged']['checksum']}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
