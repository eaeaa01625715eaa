"""Bounded soak: many clients streaming with adapters of all six kinds while adapters churn.

The command line over tests/support/soak.py, which says what runs and what is checked: it writes the tiny test
model, its tokenizer and the adapter zoo to a temporary folder, runs the soak there, prints the report, writes
it as JSON and exits 1 if a check failed.

    python -m benchmarks.soak                       # 64 clients, 60 s
    python -m benchmarks.soak --seconds 20 --out /tmp/soak.json
"""

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from tests.support.adapter_zoo import save_zoo
from tests.support.models import save_tiny
from tests.support.soak import SoakConfig, run
from tests.support.tiny_tokenizer import save_tokenizer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-requests", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "soak.json")
    args = parser.parse_args()
    config = SoakConfig(seconds=args.seconds, clients=args.clients, max_requests=args.max_requests, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_path = save_tiny("llama", work)
        save_tokenizer(model_path)
        zoo = save_zoo(model_path, work / "zoo")
        report = run(config, model_path=model_path, zoo=zoo, work=work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**asdict(report), "ok": report.ok}, indent=2) + "\n")
    print(f"soak: {report.requests} requests by {config.clients} clients in {report.wall_seconds} s, {report.tokens} tokens")
    print(f"  outcomes: {report.outcomes}")
    print(f"  hostile requests: {report.faults}; probes: {report.probes}")
    print(f"  server statuses: {report.server_statuses}")
    print(f"  adapter churn: {report.churn}")
    print(f"  errors logged: {len(report.errors_logged)} (gRPC sends racing a deadline: "
          f"{report.grpc_sends_after_deadline}); leaks: {report.leaks or 'none'}")
    print(f"  RSS: {report.rss_warm_mb} MB after warm-up, {report.rss_end_mb} MB at the end")
    print(f"  {'OK' if report.ok else 'FAILED: ' + '; '.join(report.problems)}  ({args.out})")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
