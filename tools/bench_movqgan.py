"""Images per second of MoVQGAN encode and decode (random weights; 256x256 images).

    python tools/bench_movqgan.py --preset 67M --batch 4                # CPU here
    python tools/bench_movqgan.py --preset 270M --batch 64 --device cuda  # bf16 autocast

Pass --checkpoint to time real weights (the speed is the same; the codes are not random).
"""

from __future__ import annotations

import argparse

import torch

from megatron_t2i.tokenizers.movqgan import PRESETS, MoVQGAN, count_parameters, throughput


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="67M")
    ap.add_argument("--checkpoint", default=None, help="a movqgan_*.ckpt to load instead")
    ap.add_argument("--batch", type=int, default=4, help="images per encode/decode call")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.checkpoint:
        tok = MoVQGAN.from_checkpoint(args.checkpoint, device=args.device, batch_size=args.batch)
    else:
        tok = MoVQGAN.from_config(args.preset, device=args.device, batch_size=args.batch)
    where = (torch.cuda.get_device_name(tok.device) + ", bf16 autocast"
             if tok.device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads, fp32")
    print(f"MoVQGAN {tok.name or args.preset} ({count_parameters(tok.config) / 1e6:.1f}M "
          f"params) on {where}, batch {args.batch}")
    for key, value in throughput(tok, args.batch, args.repeats).items():
        print(f"  {key}: {value:.2f}")


if __name__ == "__main__":
    main()
