"""What a server with no request in flight may still hold, and a bounded wait until it holds only that.

Idle means: no request in the engine, the scheduler or the service's streams; no adapter version pinned or
placed; every KV block in use owned by an adapter on the device (a prefix/prompt kind's shared prefix);
every adapter slot either free or held by one weight adapter on the device; no retired version left in
memory. The snapshot is taken on the engine thread, so it is consistent.
"""

import time

from quiver.engine.engine import Engine
from quiver.engine.service import EngineService


def leaks(service: EngineService) -> list[str]:
    """What the engine holds beyond idle, one line per problem; [] when idle."""
    def snapshot(engine: Engine) -> list[str]:
        open_streams = [f"{len(service._streams)} streams open"] if service._streams else []
        return _engine_leaks(engine) + open_streams

    return service._call(snapshot).result(timeout=30)


def wait_idle(service: EngineService, *, timeout: float = 10.0) -> list[str]:
    """Poll `leaks` until [] (aborts reach the engine at its next turn) or `timeout` seconds; the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        found = leaks(service)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def _engine_leaks(engine: Engine) -> list[str]:
    found = []
    scheduler, registry, blocks = engine.scheduler, engine.adapters, engine.blocks
    if engine.requests or scheduler.running or scheduler.waiting:
        found.append(f"requests held: {sorted(engine.requests)[:5]}, running {len(scheduler.running)}, "
                     f"waiting {len(scheduler.waiting)}")
    versions = {*registry.current.values(), *registry._on_device, *registry._on_host}
    for v in versions:
        if v.pins or v.placements:
            found.append(f"adapter {v.adapter_id!r} v{v.version}: {v.pins} pins, {v.placements} placements")
        if v.retired:
            found.append(f"adapter {v.adapter_id!r} v{v.version} is retired but still in memory")
    prefix_blocks = [b for v in registry._on_device if v.ref.slot < 0 for b in v.blocks]
    if blocks.num_used != len(prefix_blocks):
        found.append(f"{blocks.num_used} KV blocks used, {len(prefix_blocks)} owned by adapter prefixes")
    slotted = [v.ref.slot for v in registry._on_device if v.ref.slot >= 0]
    slots = sorted(registry._free_slots + slotted)
    if slots != list(range(registry.device.num_adapter_slots)):
        found.append(f"adapter slots: free {sorted(registry._free_slots)}, held {sorted(slotted)}")
    return found
