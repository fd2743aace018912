"""SAM image-encoder forward alone: segment_anything's attention against ours through SDPA.

One model instance, one batch of preprocessed random images, the two attentions
timed in alternating rounds (so a machine whose load drifts hurts both alike);
the best round of each counts. Also prints how far apart the outputs are.

    python bench/encoder_attention.py --model_type vit_b --rounds 3                  # CPU
    python bench/encoder_attention.py --device cuda --model_type vit_h --batch 8 --precision bf16
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from partwhole.common.runtime import PRECISIONS  # noqa: E402
from partwhole.masks.sam_attention import set_attention  # noqa: E402
from partwhole.masks.teachers import SAM1, TEACHERS, build_teacher  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model_type", default="vit_b", choices=[t.name for t in TEACHERS.values() if t.family is SAM1])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=sorted(PRECISIONS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sam = build_teacher(args.model_type).to(device)
    with torch.no_grad():  # trained SAMs have non-zero relative-position tables; random ones start at zero
        for name, table in sam.image_encoder.named_parameters():
            if "rel_pos" in name:
                table.copy_(torch.randn_like(table) * 0.5)
    size = sam.image_encoder.img_size
    images = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model_type} image encoder, batch {args.batch} at {size} px, {device} ({name}), torch {torch.__version__}; "
          f"best of {args.rounds} alternating rounds")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for precision in args.precision:
        autocast = (contextlib.nullcontext() if precision == "fp32"
                    else torch.autocast(device.type, dtype=PRECISIONS[precision]))
        best, outputs = {"reference": float("inf"), "sdpa": float("inf")}, {}
        with torch.inference_mode(), autocast:
            for attention in best:  # untimed warm-up of each
                set_attention(sam, attention)
                outputs[attention] = sam.image_encoder(images).float()
            for _ in range(args.rounds):
                for attention in best:
                    set_attention(sam, attention)
                    sync()
                    start = time.perf_counter()
                    sam.image_encoder(images)
                    sync()
                    best[attention] = min(best[attention], time.perf_counter() - start)
        diff = (outputs["sdpa"] - outputs["reference"]).abs().max().item()
        scale = outputs["reference"].abs().max().item()
        print(f"{precision}: reference attention {args.batch / best['reference']:.3g} images/s, "
              f"SDPA {args.batch / best['sdpa']:.3g} images/s: {best['reference'] / best['sdpa']:.2f}x; "
              f"max |difference| {diff:.2e} (outputs up to {scale:.2e})", flush=True)


if __name__ == "__main__":
    main()
