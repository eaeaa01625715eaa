"""The linear layers' products on this CPU: torch's `F.linear` (MKL) against oneDNN's packed linears
(quiver.kernels.packed_linear), on the default model's shapes (the engine's fused q/k/v and gate/up, o, down and
the LM head) at a decode batch's and a prefill chunk's rows, every layer's weights in turn (30 layers: the weights
come from memory, as in a step), and on the step_overhead skeleton's shapes (hidden 64, 128 rows).

    python -m benchmarks.linear            # JSON on stdout and in benchmarks/out/linear.json
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import machine
from quiver.kernels import packed_linear

DEFAULT = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # SmolLM2-135M: q/k/v, o, gate/up, down
SKELETON = [(128, 64), (64, 64), (352, 64), (64, 176)]


def timed(layers: list[list[tuple]], rows: int, use_packed: bool, rounds: int) -> float:
    """Median over rounds of one pass over every layer's products, in ms."""
    xs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w, _ in layers[0]}
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for layer in layers:
            for w, packed in layer:
                packed(xs[w.shape[1]]) if use_packed else F.linear(xs[w.shape[1]], w)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def case(shapes: list[tuple[int, int]], layers: int, rows: int, rounds: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    made = [[(w, packed_linear.pack(w)) for w in (torch.randn(o, i, generator=gen) * i ** -0.5 for o, i in shapes)]
            for _ in range(layers)]
    flops = 2 * rows * sum(o * i for o, i in shapes) * layers
    mkl = timed(made, rows, False, rounds)
    onednn = timed(made, rows, True, rounds)
    return {"rows": rows, "layers": layers, "f_linear_ms": round(mkl, 3), "packed_ms": round(onednn, 3),
            "f_linear_gflop_s": round(flops / mkl / 1e6, 1), "packed_gflop_s": round(flops / onednn / 1e6, 1),
            "speedup": round(mkl / onednn, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    if not packed_linear.available():
        raise SystemExit("oneDNN packed linears are not available here (or QUIVER_NATIVE_KERNELS=0)")
    result = {"machine": machine.describe(), "cases": {
        "default model, decode (64 rows)": case(DEFAULT, 30, 64, args.rounds),
        "default model, prefill chunk (512 rows)": case(DEFAULT, 30, 512, args.rounds),
        "default model, LM head (64 rows)": case([(49152, 576)], 1, 64, args.rounds),
        "skeleton (128 rows, 1 thread)": None,
    }}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    result["cases"]["skeleton (128 rows, 1 thread)"] = case(SKELETON, 22, 128, 5 * args.rounds)
    torch.set_num_threads(threads)
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "linear.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result["cases"], indent=2))


if __name__ == "__main__":
    main()
