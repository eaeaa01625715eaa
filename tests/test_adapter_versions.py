"""Requests finish on the adapter version they pinned, whatever happens to its files meanwhile.

With `host_cache_bytes=1` every idle adapter is dropped from host memory, so a queued request's version is
read again when it starts. Its adapter is unloaded or replaced (by another kind, by another LoRA) while it
waits, the way the server does it: an upload commits the new files into the same store path, then loads
them; a path load's directory is deleted and rewritten. The queued request must give exactly what version 1
gives alone (PEFT's reference), the requests around it theirs, and its KV blocks must be cached under the
key of version 1.
"""

import json
import shutil
from pathlib import Path

import pytest

from quiver.adapters.formats import CONFIG_FILE, WEIGHTS_FILE
from quiver.adapters.snapshots import Snapshots
from quiver.adapters.store import AdapterStore
from quiver.engine.block_manager import block_key, root_key
from quiver.engine.request import SamplingParams
from quiver.errors import FailedPrecondition
from tests.support.adapter_zoo import greedy_reference, reference_model
from tests.support.harness import make_service
from tests.support.idle import wait_idle
from tests.support.models import eager

LONG = SamplingParams(max_new_tokens=200, ignore_eos=True)  # holds the only running place meanwhile
SHORT = SamplingParams(max_new_tokens=8, ignore_eos=True)
PROMPTS = {"long": [3, 4, 5], "x": [7, 8, 9, 10, 11, 12, 13, 14, 15, 16], "base": [20, 21, 22], "other": [30, 31, 32]}


def _upload(store: AdapterStore, adapter_id: str, source: Path, *, replace: bool) -> Path:
    """What UploadAdapter does before it loads: stage the files, then commit them into the store's path."""
    staged = store.stage(adapter_id)
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        staged.write(file_name=file, data=(source / file).read_bytes())
    staged.finish()
    return staged.commit(replace=replace)


def _version(service, adapter_id: str) -> int:
    return service._call(lambda engine: engine.adapters.current[adapter_id].version).result()


def _tokens(stream) -> list[int]:
    return [t for out in stream for t in out.new_token_ids]


class Scenario:
    """X served from the store (upload) or from a directory (path load), then changed while a request waits."""

    def __init__(self, service, zoo, root: Path, *, uploaded: bool) -> None:
        self.service, self.zoo, self.uploaded = service, zoo, uploaded
        self.store = AdapterStore(root / "store", max_adapter_bytes=1 << 26)
        self.path = _upload(self.store, "x", zoo["lora"], replace=False) if uploaded else root / "x"
        if not uploaded:
            shutil.copytree(zoo["lora"], self.path)
        service.load_adapter("x", self.path)
        self.store.settle("x")

    def unload(self) -> None:
        self.service.unload_adapter("x")
        if self.uploaded:
            self.store.delete("x")
        else:
            shutil.rmtree(self.path)

    def replace(self, kind: str) -> None:
        if self.uploaded:
            path = _upload(self.store, "x", self.zoo[kind], replace=True)
            self.service.load_adapter("x", path, replace=True)
            self.store.settle("x")
        else:
            shutil.rmtree(self.path)
            shutil.copytree(self.zoo[kind], self.path)
            self.service.load_adapter("x", self.path, replace=True)


@pytest.mark.parametrize("uploaded", [True, False], ids=["upload", "path"])
@pytest.mark.parametrize("change", ["unload", "replace-by-prefix", "replace-by-lora"])
def test_a_queued_request_finishes_on_the_version_it_pinned(model_path, zoo, tmp_path, uploaded, change):
    service = make_service(model_path, host_cache_bytes=1, max_num_seqs=1)
    try:
        service.load_adapter("other", zoo["bottleneck"])
        scenario = Scenario(service, zoo, tmp_path, uploaded=uploaded)
        v1 = _version(service, "x")
        streams = {"long": service.submit(PROMPTS["long"], LONG)}
        streams |= {"x": service.submit(PROMPTS["x"], SHORT, adapter_id="x", request_id="x")}
        streams |= {"base": service.submit(PROMPTS["base"], SHORT)}
        streams |= {"other": service.submit(PROMPTS["other"], SHORT, adapter_id="other")}
        if change == "unload":
            scenario.unload()
        else:
            scenario.replace(change.removeprefix("replace-by-").replace("lora", "lora-all-r4"))
        waiting = service._call(lambda engine: [r.request_id for r in engine.scheduler.waiting]).result()
        assert "x" in waiting  # the change came while the request waited, its weights out of host memory
        tokens = {name: _tokens(stream) for name, stream in streams.items()}

        references = {"x": reference_model(model_path, "lora", zoo["lora"]),
                      "other": reference_model(model_path, "bottleneck", zoo["bottleneck"])}
        base = eager(model_path)
        for name, params in (("long", LONG), ("x", SHORT), ("base", SHORT), ("other", SHORT)):
            assert tokens[name] == greedy_reference(references.get(name, base), PROMPTS[name], params.max_new_tokens)[0], name

        key = block_key(root_key(("x", v1), None), PROMPTS["x"][:8])  # its first full block, under version 1
        registry = service.engine.adapters
        assert service._call(lambda engine: key in engine.blocks._block_of).result()
        assert registry.num_reads >= 1
        assert not wait_idle(service)
        current = service._call(lambda engine: len(engine.adapters.current)).result()
        assert len(list(registry.snapshots.root.iterdir())) == current  # version 1's snapshot is gone
    finally:
        service.shutdown()


def test_an_in_place_edit_of_a_loaded_file_ends_only_the_requests_of_that_version(model_path, zoo, tmp_path):
    """A path load's files edited in place (a hard-linked snapshot sees the edit): the queued request of that
    version ends alone with FailedPrecondition; the others finish with their tokens."""
    service = make_service(model_path, host_cache_bytes=1, max_num_seqs=1)
    try:
        path = tmp_path / "x"
        shutil.copytree(zoo["lora"], path)
        service.load_adapter("x", path)
        streams = {"long": service.submit(PROMPTS["long"], LONG), "x": service.submit(PROMPTS["x"], SHORT, adapter_id="x")}
        streams["base"] = service.submit(PROMPTS["base"], SHORT)
        config = json.loads((path / CONFIG_FILE).read_text())
        with open(path / CONFIG_FILE, "r+") as f:  # the same inode, as an editor or save_pretrained rewrites it
            f.write(json.dumps(config | {"lora_alpha": 4}))
            f.truncate()
        with pytest.raises(FailedPrecondition, match=f"adapter 'x' .* cannot be read again: {CONFIG_FILE} was changed in place"):
            _tokens(streams["x"])
        base = eager(model_path)
        assert _tokens(streams["long"]) == greedy_reference(base, PROMPTS["long"], LONG.max_new_tokens)[0]
        assert _tokens(streams["base"]) == greedy_reference(base, PROMPTS["base"], SHORT.max_new_tokens)[0]
        assert str(tmp_path) not in str(service.list_adapters())
    finally:
        service.shutdown()


def test_snapshot_directories_of_crashed_engines_are_removed_and_live_ones_kept(tmp_path, zoo):
    live = Snapshots(tmp_path)
    live.take(zoo["lora"])
    crashed = tmp_path / "quiver-snapshots-crashed"
    (crashed / "v1").mkdir(parents=True)
    (crashed / "v1" / CONFIG_FILE).write_text("{}")
    other = tmp_path / "unrelated"
    other.mkdir()
    Snapshots(tmp_path)
    assert not crashed.exists() and live.root.is_dir() and other.is_dir()
    root = live.root
    del live
    assert not root.exists()
