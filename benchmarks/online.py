"""Online serving over gRPC: latency under Poisson load, with adapters of all six kinds.

A real `quiver serve` runs in a child process on the default model, with `--per-kind` adapters of each kind
loaded through LoadAdapter (made with PEFT: LoRA r=16 on all linear layers, bottleneck, prefix, P-tuning v2,
prompt, P-tuning). For each rate, the load generator (benchmarks/loadgen.py, another process) sends
requests with exponential inter-arrival times for `--seconds`, each to an adapter picked at random (kind
first, then one of its adapters); prompts are chatterbot-corpus questions sent as chat messages, and each
request generates as many tokens as the corpus answer has (EOS ignored). Reported per rate: p50/p90/p99
of time to first token (TTFT), time per output token after the first (TPOT) and end-to-end latency, as the
client measures them; and the highest rate at which p99 TPOT stays within `--tpot-bound-ms` (every
request completed): the last rate before the first one over the bound. Rates go up in order and stop
after `--stop-after` rates in a row over the bound (0: run every rate).

    python -m benchmarks.online --quick     # 3 rates x 25 s, one adapter per kind: about 2-3 minutes
    python -m benchmarks.online             # up to 7 rates (0.5-8/s) x 60 s, three adapters per kind
"""

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

from benchmarks import data, machine
from benchmarks.server_proc import ROOT, ServerProcess
from benchmarks.stats import summary
from quiver.client import QuiverClient
from quiver.config import default_cache_dir
from quiver.model.loader import default_model_dir

KINDS = ("lora", "bottleneck", "prefix", "ptuning-v2", "prompt", "ptuning")
METRICS = ("ttft", "tpot", "e2e")


def make_adapters(model_path: Path, root: Path, per_kind: int) -> dict[str, dict[str, str]]:
    """per_kind adapters of each kind under root: {kind: {adapter id: its dir relative to root}}."""
    from benchmarks.adapter_sets import kind_set, lora_set

    _, lora_dirs = lora_set(model_path, root / "lora", per_kind, rank=16)
    sets = kind_set(model_path, root, per_kind) | {"lora": lora_dirs}
    return {kind: {name: str(path.relative_to(root)) for name, path in sets[kind].items()} for kind in KINDS}


def workload(tokenizer, *, rate: float, seconds: float, adapters: dict[str, list[str]], seed: int,
             max_output: int) -> list[dict]:
    rng = random.Random(seed)
    times, t = [], rng.expovariate(rate)
    while t < seconds:
        times.append(t)
        t += rng.expovariate(rate)
    prompts = data.chatterbot_requests(tokenizer, len(times), seed=seed, max_output=max_output)
    return [{"at": at, "chat": chat, "max_new_tokens": n, "adapter_id": rng.choice(adapters[rng.choice(KINDS)])}
            for at, (chat, n) in zip(times, prompts)]


def run_loadgen(target: str, requests: list[dict], tmp: Path, name: str, *, timeout: float) -> dict:
    (tmp / f"{name}.workload.json").write_text(json.dumps({"requests": requests}))
    out = tmp / f"{name}.records.json"
    subprocess.run([sys.executable, "-m", "benchmarks.loadgen", "--target", target,
                    "--workload", str(tmp / f"{name}.workload.json"), "--out", str(out), "--timeout", str(timeout)],
                   check=True, timeout=timeout + 120, cwd=ROOT)
    return json.loads(out.read_text())


def rate_result(rate: float, run: dict, seconds: float, kind_of: dict[str, str]) -> dict:
    records = run["records"]
    ok = [r for r in records if r["status"] == "OK"]
    tokens = sum(r["tokens"] for r in ok)
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return {
        "rate": rate, "requests": len(records), "offered_rate": len(records) / seconds, "statuses": statuses,
        "wall_s": run["wall_s"], "output_tokens": tokens, "output_tok_s": tokens / run["wall_s"],
        "prompt_tokens": summary([r["prompt_tokens"] for r in ok], scale=1),
        "output_lengths": summary([r["tokens"] for r in ok], scale=1),
        **{m: summary([r[m] for r in ok if r[m] is not None]) for m in METRICS},
        "tpot_by_kind": {kind: summary([r["tpot"] for r in ok if r["tpot"] is not None and kind_of[r["adapter_id"]] == kind])
                         for kind in KINDS},
    }


def within_bound(row: dict, bound_ms: float) -> bool:
    """Every request completed and p99 TPOT is within the bound."""
    return row["statuses"].get("OK", 0) == row["requests"] and row["tpot"]["p99"] is not None and row["tpot"]["p99"] <= bound_ms


def max_rate_within(rows: list[dict], bound_ms: float) -> float | None:
    """The last rate before the first one over the bound (None if the lowest is over it)."""
    best = None
    for row in rows:
        if not within_bound(row, bound_ms):
            break
        best = row["rate"]
    return best


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rates"]
    rates = [r["rate"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    titles = {"ttft": "time to first token", "tpot": "time per output token", "e2e": "end-to-end latency"}
    for ax, m in zip(axes, METRICS):
        for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            ax.plot(rates, [float("nan") if r[m][q] is None else r[m][q] for r in rows], style, label=q)
        if m == "tpot":
            ax.axhline(result["tpot_bound_ms"], color="red", lw=1, label=f"bound {result['tpot_bound_ms']:.0f} ms")
        ax.set(title=titles[m], xlabel="arrival rate (requests/s)", ylabel="ms", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Quiver online serving over gRPC, {result['model']}, six adapter kinds mixed "
                 f"({result['machine']['cores']} CPU cores, commit {result['machine']['commit']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="rates 0.25,0.5,1 x 25 s, one adapter per kind")
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 1, 2, 3, 4, 6, 8],
                   help="requests per second, comma-separated, ascending")
    p.add_argument("--seconds", type=float, default=60.0, help="arrivals last this long at each rate")
    p.add_argument("--per-kind", type=int, default=3, help="adapters of each kind")
    p.add_argument("--tpot-bound-ms", type=float, default=250.0, help="the p99 TPOT a rate must stay within")
    p.add_argument("--stop-after", type=int, default=2, help="stop after this many rates in a row over the bound; 0: never")
    p.add_argument("--max-output", type=int, default=128, help="longest output, tokens (corpus answers are clipped)")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline of each request, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/online.json"))
    if "--quick" in sys.argv[1:]:  # new defaults; flags given explicitly still win
        p.set_defaults(rates=[0.25, 0.5, 1], seconds=25.0, per_kind=1)
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", *sys.argv])
    load_start = os.getloadavg()  # other work on the machine skews the timings: recorded beside them

    model_path = default_model_dir(default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    result = {"model": model_path.name, "tpot_bound_ms": args.tpot_bound_ms, "seconds_per_rate": args.seconds,
              "adapters_per_kind": args.per_kind, "max_output": args.max_output, "command": command, "rates": []}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        adapters = make_adapters(model_path, tmp / "adapters", args.per_kind)
        flags = ["--adapters-dir", str(tmp / "none"), "--adapter-root", str(tmp / "adapters"), "--store-dir", str(tmp / "store")]
        with ServerProcess(flags, log_path=args.out.with_suffix(".server.log")) as server:
            server.wait_serving()
            with QuiverClient(server.target) as client:
                for kind in KINDS:
                    for adapter_id, rel in adapters[kind].items():
                        client.load_adapter(adapter_id, rel)
            ids = {kind: sorted(adapters[kind]) for kind in KINDS}
            result["adapters"] = ids
            warm = [{"at": 0.0, "chat": "Hello!", "max_new_tokens": 4, "adapter_id": a} for kind in KINDS for a in ids[kind]]
            run_loadgen(server.target, warm, tmp, "warmup", timeout=args.timeout)
            over = 0  # rates over the bound in a row
            for i, rate in enumerate(args.rates):
                requests = workload(tokenizer, rate=rate, seconds=args.seconds, adapters=ids,
                                    seed=args.seed + i, max_output=args.max_output)
                row = rate_result(rate, run_loadgen(server.target, requests, tmp, f"rate{rate}", timeout=args.timeout),
                                  args.seconds, {a: kind for kind in KINDS for a in ids[kind]})
                result["rates"].append(row)
                print(f"rate {rate:g}/s: {row['requests']} requests {row['statuses']}, p99 TPOT {_ms(row['tpot']['p99'])} ms, "
                      f"p99 TTFT {_ms(row['ttft']['p99'])} ms", flush=True)
                over = 0 if within_bound(row, args.tpot_bound_ms) else over + 1
                if over == args.stop_after:
                    break
    result["max_rate_within_bound"] = max_rate_within(result["rates"], args.tpot_bound_ms)
    result["machine"] = machine.describe() | {"loadavg_start": load_start, "loadavg_end": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))

    print(f"\n{'rate/s':>7}{'reqs':>6}{'tok/s':>7}  {'TTFT p50/p90/p99 ms':>22}  {'TPOT p50/p90/p99 ms':>22}  {'E2E p50/p90/p99 ms':>24}")
    for r in result["rates"]:
        cells = ["/".join(_ms(r[m][q]) for q in ("p50", "p90", "p99")) for m in METRICS]
        print(f"{r['rate']:>7g}{r['requests']:>6}{r['output_tok_s']:>7.1f}  {cells[0]:>22}  {cells[1]:>22}  {cells[2]:>24}")
    best = result["max_rate_within_bound"]
    print(f"load average (1 min) at start/end: {load_start[0]:.2f}/{result['machine']['loadavg_end'][0]:.2f}")
    print(f"highest rate with p99 TPOT <= {args.tpot_bound_ms:.0f} ms: {best if best is not None else 'none'} req/s"
          f"  -> {args.out}, {args.out.with_suffix('.png')}")
    print(f"command: {command}")


if __name__ == "__main__":
    main()
