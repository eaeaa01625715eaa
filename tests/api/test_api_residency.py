"""Residency a router can use: ListAdapters' location (the adapter's tier) and the Prometheus per-adapter tiers agree
after loads, device evictions (more adapters than slots), host-cache evictions (a host cache of one adapter),
uploads and unloads; placements count device hits and writes, and loads are timed by source."""

import re
import urllib.request

from transformers import AutoConfig

from quiver.adapters.formats import load_adapter
from quiver.client import QuiverClient
from quiver.v1 import adapters_pb2 as apb
from tests.support.harness import start_server

TIER = {apb.ADAPTER_LOCATION_DEVICE: "device", apb.ADAPTER_LOCATION_HOST: "host", apb.ADAPTER_LOCATION_DISK: "disk"}


def _scrape(running) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{running.server.metrics_port}/metrics", timeout=10).read().decode()
    return {m.group(1): float(m.group(2)) for m in (re.fullmatch(r"(\w+(?:\{[^}]*\})?) (\S+)", line)
                                                    for line in text.splitlines()) if m}


def _tiers(scraped: dict[str, float]) -> dict[str, dict[str, float]]:
    """quiver_adapter_tier as {adapter: {tier: value}}."""
    out: dict[str, dict[str, float]] = {}
    for key, value in scraped.items():
        m = re.fullmatch(r'quiver_adapter_tier\{adapter="([^"]+)",tier="(\w+)"\}', key)
        if m:
            out.setdefault(m.group(1), {})[m.group(2)] = value
    return out


def _check(running, client) -> dict[str, str]:
    """Assert that the scrape's tiers say what ListAdapters says; return ListAdapters' {id: tier}."""
    listed = {a.adapter_id: TIER[a.location] for a in client.list_adapters()}
    scraped = _scrape(running)
    tiers = _tiers(scraped)
    other = tiers.pop("other")
    for adapter_id, by_tier in tiers.items():
        assert by_tier == {t: float(t == listed[adapter_id]) for t in ("device", "host", "disk")}, (adapter_id, by_tier)
    rest = [t for a, t in listed.items() if a not in tiers]
    assert other == {t: float(rest.count(t)) for t in ("device", "host", "disk")}
    assert {t: scraped[f'quiver_adapters{{location="{t}"}}'] for t in other} == \
        {t: float(list(listed.values()).count(t)) for t in other}
    return listed


def test_tiers_in_metrics_match_list_adapters(model_path, zoo, tmp_path):
    nbytes = load_adapter(zoo["lora"], AutoConfig.from_pretrained(model_path)).nbytes
    # two slots; the host cache holds one adapter's weights (those of adapters on the device can be dropped too)
    running = start_server(model_path, tmp_path, adapter_roots=(zoo["lora"].parent,),
                           engine={"adapter_slots": 2, "max_lora_rank": 8, "host_cache_bytes": nbytes * 3 // 2})
    ask = {"text": "hi", "max_new_tokens": 2, "ignore_eos": True}
    try:
        with QuiverClient(running.target) as c:
            for i in range(4):
                c.load_adapter(f"a{i}", "lora")
            listed = _check(running, c)
            assert listed == {"a0": "disk", "a1": "disk", "a2": "disk", "a3": "host"}  # the newest stays in memory

            c.generate(adapter_id="a0", **ask)
            c.generate(adapter_id="a3", **ask)
            listed = _check(running, c)
            assert listed["a0"] == listed["a3"] == "device" and sorted(listed.values()).count("device") == 2

            c.generate(adapter_id="a1", **ask)  # both slots are taken: one of a0, a3 leaves the device
            listed = _check(running, c)
            assert listed["a1"] == "device" and list(listed.values()).count("device") == 2
            c.generate(adapter_id="a1", **ask)  # still on the device: a hit
            c.upload_adapter("u", zoo["lora"])
            listed = _check(running, c)
            assert listed["u"] == "host" and listed["a1"] == "device"
            c.generate(adapter_id="u", **ask)  # placed from host memory, evicting the other of a0, a3
            listed = _check(running, c)
            assert listed["u"] == listed["a1"] == "device" and list(listed.values()).count("device") == 2

            c.unload_adapter("a1")
            listed = _check(running, c)
            assert "a1" not in listed and list(listed.values()).count("device") == 1
            scraped = _scrape(running)
            assert 'quiver_adapter_tier{adapter="a1",tier="device"}' not in scraped

        assert scraped['quiver_adapter_evictions_total'] >= 1
        assert scraped['quiver_adapter_placements_total{result="write"}'] == 4
        assert scraped['quiver_adapter_placements_total{result="hit"}'] == 1
        loads = {s: scraped.get(f'quiver_adapter_load_seconds_count{{source="{s}"}}', 0)
                 for s in ("path", "upload", "store", "host_cache")}
        # LoadAdapter x4, UploadAdapter x1; placements: a0, a3 (dropped from memory when a0 was read) and a1 read
        # again from their snapshots, u from memory
        assert loads == {"path": 4, "upload": 1, "store": 3, "host_cache": 1}
        requests = {a: scraped.get(f'quiver_adapter_requests_total{{adapter="{a}"}}') for a in ("a0", "a3", "u", "other")}
        assert requests == {"a0": 1, "a3": 1, "u": 1, "other": 0}  # a1's series (2) went with it
    finally:
        running.stop()
