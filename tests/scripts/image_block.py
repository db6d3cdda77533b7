"""Sample image blocks with guidance and top-k from a checkpoint; print JSON.

    image_block.py CHECKPOINT
"""

import json
import sys

from megatron_t2i.eval import loading
from megatron_t2i.eval.generate import SamplingParams, generate_image_block


def main() -> None:
    cfg, chunks, layout, _ = loading.load_for_eval(sys.argv[1])
    text = loading.text_tokenizer_for(cfg)
    captions = [text.encode(c) for c in ("a red circle at the top left", "")]
    n = cfg.data.image_tokens_per_sample
    out = {"layout": layout.to_dict(), "tokens_per_image": n}
    for name, scale, interval in (("plain", 1.0, 0), ("guided", 3.0, 0),
                                  ("interval", 3.0, 4)):
        block = generate_image_block(chunks[0], layout, captions, n,
                                     SamplingParams(temperature=1.0, top_k=3, seed=1),
                                     guidance_scale=scale, guidance_interval=interval)
        out[name] = block.tolist()
    loading.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
