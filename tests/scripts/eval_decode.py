"""Decode with a checkpoint at the launch's TP, with and without the KV cache; print JSON.

    [torchrun --nproc_per_node 2] eval_decode.py CHECKPOINT TP OUT_JSON
"""

import json
import sys

from megatron_t2i.eval import loading
from megatron_t2i.eval.generate import (
    Decoder,
    SamplingParams,
    caption_prompt,
    complete_text,
    generate_image_codes,
)


def main() -> None:
    checkpoint, tp, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    cfg, chunks, layout, _ = loading.load_for_eval(checkpoint, tp=tp)
    text = loading.text_tokenizer_for(cfg)
    captions = [text.encode(c) for c in ("a red circle at the top left",
                                         "a blue square at the centre and a green triangle "
                                         "at the bottom right", "")]
    n_codes = cfg.data.image_tokens_per_sample
    result = {}
    for cache in (True, False):
        greedy = generate_image_codes(chunks[0], layout, captions, n_codes,
                                      SamplingParams(temperature=0.0), use_kv_cache=cache)
        guided = generate_image_codes(chunks[0], layout, captions, n_codes,
                                      SamplingParams(temperature=1.0, top_k=40, top_p=0.9,
                                                     seed=7),
                                      guidance_scale=3.0, use_kv_cache=cache)
        words = complete_text(chunks[0], layout, captions[:2], 12, use_kv_cache=cache)
        result["cache" if cache else "recompute"] = {
            "greedy": greedy.tolist(), "guided": guided.tolist(), "completions": words}
    prompts = [caption_prompt(c, layout) for c in captions]
    result["prefill_logits"] = Decoder(chunks[0], prompts, 1).logits().tolist()
    loading.close()
    if loading.is_writer():
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
