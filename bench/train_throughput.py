"""Training-step throughput of the Agglomerator at the config_IMAGENETTE.cfg size.

Measures samples/s of forward + sam_distill loss + backward for
* the baseline: the reference maths (``reference_agglomerator.py``: fp32, eager,
  einsum attention, ``b n l d`` layout with rearranges, grouped Conv1d), and
* ours: ``agglomerator.model.Agglomerator`` in fp32 and in our default precision
  (``--precision auto``: bf16 autocast where the device computes bf16 natively),
  optionally ``torch.compile``-d,
on the same weights and inputs, in the same run, and prints the ratios.

    python bench/train_throughput.py                      # CPU, batch 16
    python bench/train_throughput.py --device cuda --batch_size 128 --compile
    python bench/train_throughput.py --tiny --iters 1 --compile --compile_backend eager   # seconds: a dry run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hierarchical_masks.per_image_runner import bf16_native  # noqa: E402
from suite_table import save_rows  # noqa: E402
from agglomerator.model import Agglomerator, AgglomeratorConfig  # noqa: E402
from agglomerator.objectives import levels_distill_loss  # noqa: E402
from reference_agglomerator import ReferenceAgglomerator, reference_levels_loss  # noqa: E402


def time_steps(step, device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of one call of ``step`` after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of our model")
    parser.add_argument("--compile_backend", default="inductor", help="torch.compile backend (eager: a quick dry run of the traced path)")
    parser.add_argument("--tiny", action="store_true", help="a 32 px, 16-dim model instead of config_IMAGENETTE's (dry runs)")
    parser.add_argument("--summary_json", default=None, help="append the figures as JSON lines here (bench/suite_table.py)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = AgglomeratorConfig()  # config_IMAGENETTE.cfg: 224 px, 56x56 tokens, 14x14 columns, 3 levels of 256
    if args.tiny:
        config = AgglomeratorConfig(image_size=32, conv_image_size=8, patch_size=2, patch_dim=16, levels=3, iters=2)
    model_name = "tiny model (--tiny)" if args.tiny else "config_IMAGENETTE.cfg model"
    ours = Agglomerator(config).to(device)
    reference = ReferenceAgglomerator(config).to(device)
    reference.load_state_dict(ours.state_dict())
    images = torch.randn(args.batch_size, 3, config.image_size, config.image_size, device=device)
    embeds = torch.randn(args.batch_size, config.num_patches, config.levels, ours.embed_dim, device=device)
    bf16 = bf16_native(device.type)

    def reference_step():
        reference.zero_grad(set_to_none=True)
        _, _, encoded = reference(images)
        reference_levels_loss(encoded, embeds).backward()

    def our_step(model, autocast: bool):
        def step():
            model.zero_grad(set_to_none=True)
            context = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext()
            with context:
                out = model(images)
                loss = levels_distill_loss(out.encoded, embeds)
            loss.backward()
        return step

    rows = [("reference", "baseline: reference maths, fp32 eager", reference_step), ("fp32", "ours, fp32", our_step(ours, False))]
    default_name = f"ours, default precision ({'bf16-mixed' if bf16 else 'fp32'})"
    if bf16:
        rows.append(("default", default_name, our_step(ours, True)))
    if args.compile:
        compiled = torch.compile(ours, backend=args.compile_backend)
        backend = "" if args.compile_backend == "inductor" else f" (backend {args.compile_backend})"
        rows.append(("compile", f"ours, {'bf16-mixed' if bf16 else 'fp32'} + torch.compile{backend}", our_step(compiled, bf16)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch_size}; {model_name} "
          f"({sum(p.numel() for p in ours.parameters()) / 1e6:.1f} M parameters); median of {args.iters} steps")
    baseline = None
    for key, label, step in rows:
        start = time.perf_counter()
        seconds = time_steps(step, device, args.warmup, args.iters)
        warm = time.perf_counter() - start - seconds * args.iters  # the warm-up steps (with the compile, if any)
        rate = args.batch_size / seconds
        baseline = baseline or rate
        print(f"{label:<48} {rate:8.1f} samples/s   {rate / baseline:5.2f}x baseline" + (f"   (warm-up {warm:.1f} s)" if key == "compile" else ""))
        if key != "reference":
            note = f"batch {args.batch_size}, median of {args.iters} steps" + (f"; warm-up (compile) {warm:.1f} s" if key == "compile" else "")
            save_rows(args.summary_json, [dict(key=key, name=f"stage 3 train step ({model_name}), {label}", value=rate,
                                               unit="samples/s", baseline="reference maths, fp32 eager", baseline_value=baseline,
                                               note=note)])  # at once: a timed-out compile keeps the other rows


if __name__ == "__main__":
    main()
