"""Stage 2 benchmark: masked images/s of our fast path against the reference per-image PIL loop.

Both paths run in the same process on the same files (synthetic images and
SAM-like nested masks written with ``mask_io``), the same model object and
weights, and read their inputs the same way; each gets a warm-up batch that is
not timed; the paths alternate for ``--rounds`` rounds and the best
round of each counts (the machine's load changes). The reference loop is the reference's algorithm (PIL masked image ->
timm transform -> model, forward passes of 32, float32) as kept in
``mask_embedding.embed_image_reference``; the fast path is
``MaskedImageEncoder`` fed by stage 2's own DataLoader.

    nice python bench/embeds_throughput.py                 # CPU: 2 images x 16 points
    python bench/embeds_throughput.py --device cuda        # GPU: 8 images x 196 points

Random weights (the default, ``--pretrained`` off) time the same as trained
ones; ``--encoder_checkpoint FILE`` loads real ones.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hierarchical_masks.embed_folder import (  # noqa: E402
    EmbedFolderConfig,
    MaskedImageDataset,
    _default_num_workers,
    item_masks,
)
from hierarchical_masks.mask_embedding import (  # noqa: E402
    MaskedImageEncoder,
    build_encoder,
    embed_image_reference,
    masked_pil_image,
    reference_transform,
)
from hierarchical_masks.mask_io import list_image_folder, load_masks, load_rgb_image, save_masks  # noqa: E402


def sam_like_masks(rng: np.random.Generator, grid: int, size: int) -> np.ndarray:
    """``(grid*grid, 3, size, size)`` nested ellipses around each point (levels 0 < 1 < 2), like SAM's."""
    yy, xx = np.mgrid[0:size, 0:size]
    masks = np.zeros((grid * grid, 3, size, size), bool)
    step = size / grid
    for k in range(grid * grid):
        cy, cx = (k // grid + 0.5) * step, (k % grid + 0.5) * step
        for level, scale in enumerate((0.6, 1.5, 3.5)):
            ry, rx = step * scale * rng.uniform(0.6, 1.4, 2)
            masks[k, level] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return masks


def make_dataset(root: Path, images: int, grid: int, size: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(images):
        folder = "class_a" if i % 2 == 0 else "class_b"
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        small.resize((320, 240), Image.BICUBIC).save(root / "images" / folder / f"img_{i}.JPEG", quality=90)
        save_masks(root / "masks" / folder / f"img_{i}.pkl", sam_like_masks(rng, grid, size), grid=grid, img_size=size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="maxvit_rmlp_pico_rw_256")
    parser.add_argument("--encoder_checkpoint", default=None, help="local weights (default: fixed random weights)")
    parser.add_argument("--images", type=int, default=None, help="default: 2 on CPU, 8 on CUDA")
    parser.add_argument("--grid", type=int, default=None, help="points per side; default 4 on CPU, 14 on CUDA")
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=None, help="fast path; default 64 on CPU, 256 on CUDA")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--also_fp32", action="store_true", help="also time the fast path in float32")
    parser.add_argument("--crop", action="store_true")
    parser.add_argument("--reference_batch", type=int, default=32)
    parser.add_argument("--as_written", action="store_true",
                        help="also time the reference script's loop as written (autograd on, masks re-read per level)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds; the best of each path counts")
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    images = args.images or (8 if cuda else 2)
    grid = args.grid or (14 if cuda else 4)
    batch_size = args.batch_size or (256 if cuda else 64)
    if cuda:
        torch.backends.cudnn.benchmark = True

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_dataset(root, images, grid, args.img_size)
        cfg = EmbedFolderConfig(in_masks_path=root / "masks", in_images_path=root / "images", out_data_path=root / "out",
                                img_height=args.img_size, img_width=args.img_size)
        records = list_image_folder(root / "images")
        model = build_encoder(args.model, pretrained=False, checkpoint=args.encoder_checkpoint, device=device)
        transform = reference_transform(model)
        n_masked = images * grid * grid * 3
        name = f"{args.model} ({'checkpoint' if args.encoder_checkpoint else 'random weights'})"
        print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else f'{torch.get_num_threads()} threads'}), "
              f"{name}, {images} images x {grid * grid} points x 3 levels = {n_masked} masked images, crop={args.crop}")

        warm = load_rgb_image(records[0].path, (args.img_size, args.img_size))
        embed_image_reference(model, transform, warm, load_masks(cfg.mask_path(records[0]))[:2, :1], crop=args.crop)
        precisions = [args.precision] + (["fp32"] if args.also_fp32 and args.precision != "fp32" else [])
        encoders = [MaskedImageEncoder(model, device=device, crop=args.crop, batch_size=batch_size, precision=p) for p in precisions]
        dataset = MaskedImageDataset(records, cfg, grid * grid, cfg.mask_path(records[0]))
        num_workers = _default_num_workers(device, 1)
        for encoder in encoders:  # warm-up, not timed
            item = dataset[0]
            list(encoder.embed_stream([(0, item["image"], item_masks(item, device)[: max(1, batch_size // 3)])]))
        sync()

        def run_reference() -> list[np.ndarray]:
            """The reference loop: per image, masks and image from disk, PIL masked images, passes of 32, fp32."""
            return [embed_image_reference(model, transform, load_rgb_image(r.path, (args.img_size, args.img_size)),
                                          load_masks(cfg.mask_path(r)), crop=args.crop, batch_size=args.reference_batch)
                    for r in records]

        def run_as_written() -> list[np.ndarray]:
            """The reference script's loop as written: masks and image re-read for each level, autograd left on."""
            out = []
            for r in records:
                levels = []
                for level in range(3):
                    masks = load_masks(cfg.mask_path(r))
                    pixels = np.asarray(load_rgb_image(r.path, (args.img_size, args.img_size)))
                    masked = [masked_pil_image(pixels, m[level], args.crop) for m in masks]
                    feats = []
                    for i in range(0, len(masked), args.reference_batch):
                        batch = torch.stack([transform(im) for im in masked[i : i + args.reference_batch]]).to(device)
                        feats.extend(model(batch).cpu().detach().numpy())
                    levels.append(feats)
                out.append(np.stack(levels, axis=1))
            return out

        def run_fast(encoder: MaskedImageEncoder) -> list[np.ndarray]:
            """Our path: stage 2's DataLoader feeding MaskedImageEncoder."""
            loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=cuda,
                                                 prefetch_factor=4 if num_workers else None)
            out = dict(encoder.embed_stream((int(it["index"]), it["image"], item_masks(it, device)) for it in loader))
            return [out[i] for i in range(images)]

        def timed(fn, *fn_args) -> tuple[float, list[np.ndarray]]:
            sync()
            start = time.perf_counter()
            result = fn(*fn_args)
            sync()
            return n_masked / (time.perf_counter() - start), result

        # Interleaved rounds, best of each: on a shared machine the load changes between paths.
        ref_rates, fast_rates, reference, cos = [], [[] for _ in encoders], None, [1.0] * len(encoders)
        written_rates = []
        for round_index in range(args.rounds):
            rate, reference = timed(run_reference)
            ref_rates.append(rate)
            if args.as_written:
                written_rates.append(timed(run_as_written)[0])
            for e, encoder in enumerate(encoders):
                rate, fast = timed(run_fast, encoder)
                fast_rates[e].append(rate)
                cos[e] = min(float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())
                             for a, b in zip(fast, reference))
            print(f"round {round_index + 1}: reference {ref_rates[-1]:.2f}, "
                  + (f"reference as written {written_rates[-1]:.2f}, " if args.as_written else "")
                  + ", ".join(f"fast {enc.precision} {r[-1]:.2f}" for enc, r in zip(encoders, fast_rates)) + " masked images/s")
        ref_rate = max(ref_rates)
        print(f"reference per-image PIL loop (batches of {args.reference_batch}, fp32): {ref_rate:.2f} masked images/s (best of {args.rounds})")
        if args.as_written:
            print(f"reference script's loop as written (autograd on, inputs re-read per level): {max(written_rates):.2f} masked images/s")
        rows = []
        for encoder, rates, c in zip(encoders, fast_rates, cos):
            rate = max(rates)
            print(f"fast path ({encoder.precision}, batch {batch_size}, {num_workers} loader workers): {rate:.2f} masked images/s, "
                  f"{rate / ref_rate:.2f}x the reference; min cosine vs reference {c:.5f}"
                  + (f"; {rate / max(written_rates):.2f}x the loop as written" if args.as_written else ""))
            rows.append((encoder.precision, rate, c))
        print("\nmarkdown rows:")
        for precision, rate, cos in rows:
            print(f"| {device.type} | {name} | {images}x{grid * grid}x3 | crop={args.crop} | {ref_rate:.2f} | "
                  f"{precision}, batch {batch_size}: {rate:.2f} | **{rate / ref_rate:.2f}x** | {cos:.4f} |")


if __name__ == "__main__":
    main()
