"""Real low-bit weights on SD3 Medium's MMDiT (random weights; --model for another preset), side by side in one process: bytes at rest and
the compiled CFG step against bf16.

    python benchmarks/quant_speed.py --out docs/benchmarks/h200-quant-speed-DATE.json

Variants: bf16; W8 and W4 (group 64, every joint-block Linear and the adaLN modulation) with each of the two matmul
paths forced (`mx.quantized_matmul` on the packed weight, or dequantize-then-GEMM) and with taq's per-device choice
(`taq.quant.real.DEQUANTIZE_FROM_ROWS`). Shapes: 512 and 1024 pixels, 2 and 16 rows. Times are ms per step over
back-to-back steps (`taq.bench.per_step`), median of 3 runs. Activations are bf16 throughout: these are real
low-bit weights, not low-bit arithmetic.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
from pathlib import Path

import numpy as np

import taq
import mlx.core as mx

from taq.bench import per_step
from taq.config import get_preset
from taq.models.mmdit import MMDiT
from taq.quant.real import dequantize_from_rows, quantize_weights, weight_bytes
from taq.tracing.sites import linear_sites

SHAPES = ((512, 2), (1024, 2), (512, 16), (1024, 16))
NEVER = 2**62  # a row count no call reaches: always the quantized matmul


def build(preset, variant: tuple) -> MMDiT:
    """A seeded random MMDiT in bf16, its joint-block Linears and adaLN turned low-bit by `variant`."""
    mx.random.seed(0)
    model = MMDiT(preset.mmdit)
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    kind, bits, rows = variant
    if kind != "bf16":
        quantize_weights(model, list(linear_sites(model).values()), bits, group_size=64, dequantize_rows=rows)
    return model


def inputs(preset, resolution: int, rows: int) -> tuple:
    rng = np.random.default_rng(0)
    cfg = preset.mmdit
    latent = (rows,) + preset.latent_shape(resolution)
    return (mx.array(rng.standard_normal(latent, dtype=np.float32)).astype(mx.bfloat16), mx.full((rows,), 500.0),
            mx.array(rng.standard_normal((rows, preset.text_tokens, cfg.token_dim), dtype=np.float32)).astype(mx.bfloat16),
            mx.array(rng.standard_normal((rows, cfg.pooled_dim), dtype=np.float32)).astype(mx.bfloat16))


def time_variant(preset, model: MMDiT, shapes, repeats: int) -> dict:
    forward = mx.compile(model)
    times = {}
    for resolution, rows in shapes:
        args = inputs(preset, resolution, rows)
        outputs = []
        seconds = per_step(lambda: (outputs.clear(), outputs.append(forward(*args)), mx.async_eval(outputs)),
                           mx.synchronize, repeats, warmup=2)
        times[f"{resolution}x{rows}"] = 1e3 * statistics.median(seconds)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--model", default="sd3-medium", help="preset (random weights)")
    parser.add_argument("--shapes", nargs="+", default=[f"{r}x{n}" for r, n in SHAPES], metavar="PIXELSxROWS")
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4], choices=[4, 8], help="weight widths to time")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    preset = get_preset(args.model)
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes]
    auto = dequantize_from_rows()
    variants = {"bf16": ("bf16", 16, 0)}
    for bits in args.bits:
        variants |= {f"W{bits} quantized_matmul": ("low", bits, NEVER), f"W{bits} dequantize+GEMM": ("low", bits, 0),
                     f"W{bits} taq (dequantize from {auto} rows)": ("low", bits, auto)}
    results = {}
    for name, variant in variants.items():
        model = build(preset, variant)
        results[name] = {"weight_bytes": weight_bytes(model), "ms": time_variant(preset, model, shapes, args.repeats)}
        del model
        gc.collect()
        mx.clear_cache()
        print(name, json.dumps(results[name]), flush=True)
    reference = results["bf16"]
    for entry in results.values():
        entry["bytes_vs_bf16"] = entry["weight_bytes"] / reference["weight_bytes"]
        entry["time_vs_bf16"] = {k: v / reference["ms"][k] for k, v in entry["ms"].items()}
    doc = {"model": args.model, "device": str(mx.default_device()), "mlx": mx.__version__, "taq": taq.__version__,
           "platform": f"{platform.system()} {platform.machine()}", "repeats": args.repeats, "results": results}
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{'variant':<40} {'bytes/bf16':>10} " + " ".join(f"{k:>16}" for k in reference["ms"]))
    for name, entry in results.items():
        print(f"{name:<40} {entry['bytes_vs_bf16']:>10.3f} " + " ".join(
            f"{entry['ms'][k]:>8.1f} ({entry['time_vs_bf16'][k]:.2f}x)" for k in reference["ms"]))


if __name__ == "__main__":
    main()
