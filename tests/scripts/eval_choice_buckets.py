"""Score multiple-choice pairs of mixed lengths two ways and print both as JSON: bucketed by
length (what eval_forgetting does) and every pair padded to the longest one.

    [torchrun --nproc_per_node 2] eval_choice_buckets.py CHECKPOINT PP OUT_JSON
"""

import json
import sys

from megatron_t2i.eval import loading
from megatron_t2i.eval.forgetting import (
    _bucketed_logliks,
    choice_logliks,
    choice_sample,
    continuation_ids,
)


def main() -> None:
    checkpoint, pp, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    cfg, chunks, layout, _ = loading.load_for_eval(checkpoint, pp=pp)
    text = loading.text_tokenizer_for(cfg)
    device = next(chunks[0].parameters()).device
    words = "a red circle at the top left and a blue square at the centre".split()
    # contexts of 1 to 14 words and choices of 1 to 3 words: many lengths, several buckets
    pairs = [continuation_ids(text, " ".join(words[:1 + i % 14]), " ".join(words[-1 - i % 3:]))
             for i in range(37)]
    seq = cfg.model.seq_length
    bucketed = _bucketed_logliks(chunks, pairs, layout, seq, 4, device)
    longest = max(len(c) + len(x) + 1 for c, x in pairs)
    padded = choice_logliks(chunks, [choice_sample(c, x, layout, longest) for c, x in pairs],
                            4, device)
    if loading.is_writer():
        with open(out, "w") as f:
            json.dump({"bucketed": bucketed.tolist(), "padded": padded.tolist(),
                       "lengths": [len(c) + len(x) + 1 for c, x in pairs]}, f)
    loading.close()


if __name__ == "__main__":
    main()
