"""Stage 2 benchmark: masked images/s of our fast path against the reference per-image PIL loop.

All paths read the same files (synthetic images and SAM-like nested masks
written with ``mask_io``) with the same model and fixed random weights.
Two baselines, both the reference's algorithm (PIL masked image ->
timm transform -> model, forward passes of 32, float32, model as timm builds
it):

* the reference loop, idealised: ``mask_embedding.embed_image_reference``
  (autograd off, image and masks read once per image) -- the stricter one;
* the reference script's loop as written: autograd left on, image and masks
  re-read for each level.

The fast path is ``MaskedImageEncoder`` fed by stage 2's own DataLoader, at
stage 2's default batch size unless ``--batch_size`` names others.

Each path runs in a fresh child process per round (as a real run would: one
path's allocations cannot change another's page-fault pattern), builds the
same fixed random weights, makes one untimed pass over all images (warm-up),
then times a second; the parent alternates the paths for ``--rounds`` rounds and keeps the
best round of each. The fast path's process sets glibc's malloc as stage 2
does on CPU (``per_image_runner.keep_freed_memory``); the reference loops run
with glibc's defaults, as the reference script does. To give every path the
same allocator, run the whole benchmark under
``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776``.

    python bench/embeds_throughput.py                      # CPU: 1 image x 64 points
    python bench/embeds_throughput.py --device cuda        # GPU: 8 images x 196 points
    python bench/embeds_throughput.py --ceiling            # also the bare model forward (the upper bound)

Random weights (the default, ``--pretrained`` off) time the same as trained
ones; ``--encoder_checkpoint FILE`` loads real ones.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from suite_table import save_rows  # noqa: E402

from partwhole.common.image_folders import list_image_folder, load_rgb_image  # noqa: E402
from partwhole.common.mask_io import load_masks, save_masks  # noqa: E402
from partwhole.common.processes import keep_freed_memory  # noqa: E402
from partwhole.embeds.embed_folder import (  # noqa: E402
    EmbedFolderConfig,
    MaskedImageDataset,
    _default_num_workers,
    item_masks,
)
from partwhole.embeds.mask_embedding import (  # noqa: E402
    MaskedImageEncoder,
    build_encoder,
    default_batch_size,
    embed_image_reference,
    masked_pil_image,
    reference_transform,
)


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="maxvit_rmlp_pico_rw_256")
    parser.add_argument("--encoder_checkpoint", default=None, help="local weights (default: fixed random weights)")
    parser.add_argument("--images", type=int, default=None, help="default: 1 on CPU, 8 on CUDA")
    parser.add_argument("--grid", type=int, default=None, help="points per side; default 8 on CPU, 14 on CUDA")
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, nargs="+", default=None,
                        help="fast path, one or more sizes; default: stage 2's (256 on CUDA, 64 on CPU)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--also_fp32", action="store_true", help="also time the fast path in float32")
    parser.add_argument("--crop", action="store_true")
    parser.add_argument("--reference_batch", type=int, default=32)
    parser.add_argument("--ceiling", action="store_true",
                        help="also time the bare model forward (ready input tensors: no files, masks or transform) "
                             "at the first fast path's precision and batch: the most any pipeline could reach")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds; the best of each path counts")
    parser.add_argument("--summary_json", default=None, help="append the figures as JSON lines here (bench/suite_table.py)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: time one path in this process
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def time_one_path(args: argparse.Namespace) -> None:
    """Child process: warm up, time one pass of path ``args.child`` over the data in ``args.root``; print JSON."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    root = Path(args.root)
    cfg = EmbedFolderConfig(in_masks_path=root / "masks", in_images_path=root / "images", out_data_path=root / "out",
                            img_height=args.img_size, img_width=args.img_size)
    records = list_image_folder(root / "images")
    size = (args.img_size, args.img_size)
    model = build_encoder(args.model, pretrained=False, checkpoint=args.encoder_checkpoint, device=device)
    transform = reference_transform(model)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def run_reference() -> list[np.ndarray]:
        """The reference loop, idealised: per image, masks and image read once, PIL masked images,
        passes of 32, fp32, autograd off."""
        return [embed_image_reference(model, transform, load_rgb_image(r.path, size), load_masks(cfg.mask_path(r)),
                                      crop=args.crop, batch_size=args.reference_batch) for r in records]

    def run_as_written() -> list[np.ndarray]:
        """The reference script's loop as written: masks and image re-read for each level, autograd left on."""
        out = []
        for r in records:
            levels = []
            for level in range(3):
                masks = load_masks(cfg.mask_path(r))
                pixels = np.asarray(load_rgb_image(r.path, size))
                masked = [masked_pil_image(pixels, m[level], args.crop) for m in masks]
                feats = []
                for i in range(0, len(masked), args.reference_batch):
                    batch = torch.stack([transform(im) for im in masked[i : i + args.reference_batch]]).to(device)
                    feats.extend(model(batch).cpu().detach().numpy())
                levels.append(feats)
            out.append(np.stack(levels, axis=1))
        return out

    if args.child in ("reference", "as_written"):
        run = run_reference if args.child == "reference" else run_as_written
        label = args.child
    else:  # "fast:<precision>:<batch>" or "bare:<precision>:<batch>"
        kind, precision, batch = args.child.split(":")
        if device.type == "cpu":
            keep_freed_memory()  # as stage 2 does on CPU (embed_folder)
        encoder = MaskedImageEncoder(model, device=device, crop=args.crop, batch_size=int(batch), precision=precision)
        label = f"{encoder.precision}, batch {encoder.batch_size}"
        num_points = load_masks(cfg.mask_path(records[0])).shape[0]
        if kind == "bare":
            label = f"bare model forward ({label})"
            input_size = timm.data.resolve_model_data_config(model)["input_size"]
            inputs = torch.randn(len(records) * num_points * 3, *input_size, generator=torch.Generator().manual_seed(0))
            inputs = inputs.to(device)

            @torch.inference_mode()
            def run() -> list[np.ndarray]:
                """The model alone on ready inputs, in passes of the fast path's batch size (its forward)."""
                feats = np.concatenate([encoder._forward(x) for x in inputs.split(encoder.batch_size)])
                return list(feats.reshape(len(records), num_points, 3, feats.shape[-1]))
        else:
            dataset = MaskedImageDataset(records, cfg, num_points, cfg.mask_path(records[0]))
            num_workers = _default_num_workers(device, 1)

            def run() -> list[np.ndarray]:
                """Our path: stage 2's DataLoader feeding MaskedImageEncoder."""
                loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=cuda,
                                                     prefetch_factor=4 if num_workers else None)
                out = dict(encoder.embed_stream((int(it["index"]), it["image"], *item_masks(it, device)) for it in loader))
                return [out[i] for i in range(len(records))]

    run()  # warm-up: one untimed pass (kernels, caches, the allocator's steady state)
    sync()
    start = time.perf_counter()
    embeds = run()
    sync()
    seconds = time.perf_counter() - start
    n_masked = sum(e.shape[0] * e.shape[1] for e in embeds)
    out_file = root / f"embeds_{args.child.replace(':', '_')}.npy"
    np.save(out_file, np.stack(embeds))
    print(json.dumps({"label": label, "rate": n_masked / seconds, "embeds": str(out_file),
                      "threads": torch.get_num_threads()}))


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())


def main() -> None:
    args = parse_args()
    if args.child:
        time_one_path(args)
        return
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    images = args.images or (8 if cuda else 1)
    grid = args.grid or (14 if cuda else 8)
    batch_sizes = args.batch_size or [default_batch_size(device)]
    precisions = [args.precision] + (["fp32"] if args.also_fp32 and args.precision != "fp32" else [])
    fast_paths = [f"fast:{p}:{b}" for p in precisions for b in batch_sizes]
    bare_path = f"bare:{precisions[0]}:{batch_sizes[0]}"  # the first fast path's model forward alone
    paths = ["reference", "as_written"] + fast_paths + ([bare_path] if args.ceiling else [])
    n_masked = images * grid * grid * 3
    name = f"{args.model} ({'checkpoint' if args.encoder_checkpoint else 'random weights'})"
    print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else f'{torch.get_num_threads()} threads'}, "
          f"torch {torch.__version__}), {name}, {images} images x {grid * grid} points x 3 levels = {n_masked} masked "
          f"images, crop={args.crop}; each path in its own process", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        make_dataset(Path(tmp), images, grid, args.img_size)
        common = [sys.executable, __file__, "--root", tmp, "--device", args.device, "--model", args.model,
                  "--img_size", str(args.img_size), "--reference_batch", str(args.reference_batch)]
        common += ["--crop"] if args.crop else []
        common += ["--encoder_checkpoint", args.encoder_checkpoint] if args.encoder_checkpoint else []
        rates: dict[str, list[float]] = {p: [] for p in paths}
        labels, cosines, threads = {}, {}, None
        for round_index in range(args.rounds):
            for path in paths:
                done = subprocess.run(common + ["--child", path], capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"error: the {path} run failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                rates[path].append(result["rate"])
                labels[path], threads = result["label"], result["threads"]
                if round_index == 0 and path != bare_path:
                    cosines[path] = np.load(result["embeds"])
            print(f"round {round_index + 1}: " + ", ".join(f"{labels[p]} {rates[p][-1]:.2f}" for p in paths)
                  + " masked images/s", flush=True)

    ref_rate, written_rate = max(rates["reference"]), max(rates["as_written"])
    reference = cosines["reference"]
    print(f"reference loop, idealised (batches of {args.reference_batch}, fp32, autograd off, inputs read once): "
          f"{ref_rate:.2f} masked images/s (best of {args.rounds})")
    print(f"reference script's loop as written (autograd on, image and masks re-read per level): {written_rate:.2f} masked images/s")
    rows, summary = [], []
    for path in fast_paths:
        rate, cos = max(rates[path]), min_cosine(cosines[path], reference)
        summary.append(dict(key=path, name=f"stage 2 {args.model}, ours {labels[path]}", value=rate, unit="masked img/s",
                            baseline=f"reference loop (idealised, fp32, batch {args.reference_batch})", baseline_value=ref_rate,
                            note=f"{rate / written_rate:.2f}x the loop as written ({written_rate:.3g}/s); min cosine {cos:.4f}; "
                                 f"{images}x{grid * grid}x3 masked images, best of {args.rounds}"))
        print(f"fast path ({labels[path]}): {rate:.2f} masked images/s: {rate / ref_rate:.2f}x the idealised reference "
              f"loop, {rate / written_rate:.2f}x the loop as written; min cosine vs reference {cos:.5f}")
        rows.append(f"| {device.type}{'' if cuda else f', {threads} threads'} | {name} | {images}x{grid * grid}x3 | "
                    f"{args.crop} | {ref_rate:.2f} | {written_rate:.2f} | {labels[path]}: {rate:.2f} | "
                    f"**{rate / ref_rate:.2f}x** | {rate / written_rate:.2f}x | {cos:.4f} |")
    if args.ceiling:
        bare, first = max(rates[bare_path]), max(rates[fast_paths[0]])
        print(f"{labels[bare_path]}: {bare:.2f} masked images/s = {bare / ref_rate:.2f}x the idealised reference loop; "
              f"the fast path ({labels[fast_paths[0]]}) runs at {first / bare:.0%} of it")
    print("\nmarkdown rows:\n" + "\n".join(rows))
    save_rows(args.summary_json, summary)


if __name__ == "__main__":
    main()
