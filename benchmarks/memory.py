"""Memory: bytes per resident adapter by kind and rank, and how many adapters the host cache holds in a budget.

An engine runs in this process on the default model (fp32). Each adapter (made with PEFT) is loaded, used
by one request (which puts it on the device), and measured where the engine keeps it:
- host: what the registry's host cache counts for it (the growth of `AdapterRegistry.host_bytes`);
- device, LoRA and bottleneck: one slot of the adapter layers' buffers. Slots are padded to
  `--max-lora-rank` and `--max-bottleneck-size`, so every weight adapter reserves the same bytes there;
  "used" is the part its own rank fills;
- device, prefix and prompt kinds: the KV blocks that hold its shared prefix (the engine's used-block
  count after the request ended, times the bytes of a block); "used" is virtual tokens x KV bytes a token.
Then, for each row, the host cache capacity within `--budget-mib`: budget // host bytes; rows where that is
at most `--verify-max` are checked by loading that many copies plus a few into an engine whose host cache
has that budget and counting those still held in host memory.

    python -m benchmarks.memory             # budget 2 GiB; checks rows of up to 256 adapters (~1 minute)
    python -m benchmarks.memory --quick     # checks rows of up to 64 adapters
"""

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import machine
from benchmarks.adapter_sets import kind_set, lora_variants
from quiver.config import EngineConfig, ModelConfig, default_cache_dir
from quiver.engine.engine import Engine
from quiver.engine.request import SamplingParams
from quiver.engine.service import EngineService
from quiver.errors import InvalidArgument
from quiver.model.loader import load_model

QV = ["q_proj", "v_proj"]
LORAS = {f"lora r={r} {name}": (r, targets) for name, targets in (("all-linear", "all-linear"), ("q,v", QV))
         for r in (8, 16, 32, 64)}
KIND_ROWS = {"bottleneck": "bottleneck 32 (o_proj, down_proj)", "prefix": "prefix 16 tokens", "ptuning-v2": "ptuning-v2 20 tokens",
             "prompt": "prompt 12 tokens", "ptuning": "ptuning 10 tokens"}
MIB = 1 << 20


def slot_bytes(engine: Engine) -> int:
    """Bytes of one weight-adapter slot: every adapter-layer stack holds one slice per slot."""
    runner = engine.runner
    total = sum(b.numel() * b.element_size() for layer in runner.adapter_layers.values() for b in layer.stacks())
    return total // runner.adapter_slots


def measure(service: EngineService, adapter_id: str, path: Path, *, block_bytes: int, token_kv_bytes: int,
            slot: int) -> dict:
    engine = service.engine
    blocks_before = service.stats().kv_blocks_used
    info = service.load_adapter(adapter_id, path)
    service.generate([[1, 2, 3]], SamplingParams(max_new_tokens=1), adapter_ids=[adapter_id])
    time.sleep(0.05)  # the loop thread refreshes its stats snapshot after the step that finished the request
    info = next(i for i in service.list_adapters() if i.adapter_id == adapter_id)
    disk = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    row = {"kind": info.kind.value, "rank": info.rank, "virtual_tokens": info.num_virtual_tokens, "params": info.num_params,
           "disk_bytes": disk, "host_bytes": info.nbytes, "location_after_use": info.location}
    if info.num_virtual_tokens:
        blocks = service.stats().kv_blocks_used - blocks_before
        row |= {"device_kv_blocks": blocks, "device_bytes": blocks * block_bytes,
                "device_bytes_used": info.num_virtual_tokens * token_kv_bytes}
    else:
        row |= {"device_bytes": slot, "device_bytes_used": info.nbytes}
    service.unload_adapter(adapter_id)
    if engine.adapters.host_bytes != 0:
        raise RuntimeError(f"{adapter_id} was unloaded but the host cache still counts {engine.adapters.host_bytes} bytes")
    return row


def held_in_budget(service: EngineService, path: Path, count: int) -> int:
    """Load `count` copies of `path`; how many are held in host memory (or on the device) at the end."""
    for i in range(count):
        service.load_adapter(f"copy{i}", path)
    held = sum(i.location != "disk" for i in service.list_adapters())
    for i in range(count):
        service.unload_adapter(f"copy{i}")
    return held


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="check only rows of at most 64 adapters")
    p.add_argument("--budget-mib", type=int, default=2048, help="host cache budget (the server's --host-cache-bytes)")
    p.add_argument("--verify-max", type=int, default=256, help="check rows whose computed capacity is at most this")
    p.add_argument("--max-lora-rank", type=int, default=64, help="the server's --max-lora-rank (slot size)")
    p.add_argument("--max-bottleneck-size", type=int, default=64, help="the server's --max-bottleneck-size")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/memory.json"))
    if "--quick" in sys.argv[1:]:  # new defaults; flags given explicitly still win
        p.set_defaults(verify_max=64)
    args = p.parse_args()
    command = shlex.join(["python", *sys.argv])
    budget = args.budget_mib * MIB

    loaded = load_model(ModelConfig(cache_dir=default_cache_dir()))
    config = EngineConfig(num_kv_blocks=64, adapter_slots=2, max_lora_rank=args.max_lora_rank,
                          max_bottleneck_size=args.max_bottleneck_size, host_cache_bytes=budget)
    service = EngineService(Engine(loaded, config))
    engine = service.engine
    kv = engine.runner.kv_cache  # [L, 2, NB, BS, KVH, D]
    block_bytes = kv.numel() * kv.element_size() // kv.shape[2]
    token_kv_bytes = block_bytes // kv.shape[3]
    slot = slot_bytes(engine)
    result = {"model": loaded.path.name, "dtype": str(kv.dtype).removeprefix("torch."), "budget_bytes": budget,
              "max_lora_rank": args.max_lora_rank, "max_bottleneck_size": args.max_bottleneck_size,
              "slot_bytes": slot, "kv_block_bytes": block_bytes, "block_size": kv.shape[3],
              "kv_bytes_per_token": token_kv_bytes, "command": command, "rows": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        dirs = lora_variants(loaded.path, tmp / "lora", LORAS)
        dirs |= {label: next(iter(kind_set(loaded.path, tmp, 1)[kind].values())) for kind, label in KIND_ROWS.items()}
        for n, (label, path) in enumerate(dirs.items()):
            try:
                row = measure(service, f"a{n}", path, block_bytes=block_bytes, token_kv_bytes=token_kv_bytes, slot=slot)
            except InvalidArgument as e:  # a rank or size over this engine's maximum
                result["rows"][label] = {"refused": str(e)}
                print(f"{label}: refused: {e}", flush=True)
                continue
            row["host_cache_capacity"] = budget // row["host_bytes"]
            if row["host_cache_capacity"] <= args.verify_max:
                row["host_cache_held_measured"] = held_in_budget(service, path, row["host_cache_capacity"] + 3)
            result["rows"][label] = row
            print(f"{label}: {row['host_bytes']:,} host bytes, capacity {row['host_cache_capacity']}"
                  f"{', held ' + str(row['host_cache_held_measured']) if 'host_cache_held_measured' in row else ''}", flush=True)
    service.shutdown()
    result["machine"] = machine.describe()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    print(f"\nslot: {slot / MIB:.1f} MiB (max LoRA rank {args.max_lora_rank}, bottleneck {args.max_bottleneck_size}); "
          f"KV block: {block_bytes / 1024:.0f} KiB ({kv.shape[3]} tokens); budget {args.budget_mib} MiB")
    print(f"{'adapter':<34}{'params':>11}{'host MiB':>10}{'device MiB':>12}{'dev used MiB':>14}{'fit budget':>11}{'held':>6}")
    for label, r in result["rows"].items():
        if "refused" in r:
            print(f"{label:<34}refused: {r['refused']}")
            continue
        print(f"{label:<34}{r['params']:>11,}{r['host_bytes'] / MIB:>10.2f}{r['device_bytes'] / MIB:>12.2f}"
              f"{r['device_bytes_used'] / MIB:>14.2f}{r['host_cache_capacity']:>11,}{r.get('host_cache_held_measured', '-'):>6}")
    print(f"-> {args.out}\ncommand: {command}")


if __name__ == "__main__":
    main()
