"""LoadAdapter confined to the adapter roots, UploadAdapter to the durable store (atomic, size-limited,
restored after a restart), UnloadAdapter, ListAdapters."""

import os
import shutil

import grpc
import pytest

from quiver.adapters.store import AdapterStore, validate_adapter_id
from quiver.client import QuiverClient
from quiver.errors import InvalidArgument
from quiver.v1 import adapters_pb2 as apb
from tests.support.harness import start_server


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def _leftovers(store_dir) -> list[str]:
    return sorted(os.listdir(store_dir)) + sorted(os.listdir(store_dir / ".staging"))


@pytest.fixture
def root(tmp_path, zoo):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(zoo["lora"], root / "lora")
    shutil.copytree(zoo["prompt"], root / "prompt")
    return root


def test_load_list_generate_unload(model_path, tmp_path, root):
    running = start_server(model_path, tmp_path, adapter_roots=(root,))
    try:
        with QuiverClient(running.target) as c:
            lora = c.load_adapter("my-lora", "lora")
            prompt = c.load_adapter("my-prompt", str(root / "prompt"))
            assert (lora.kind, lora.rank, lora.stored) == (apb.ADAPTER_KIND_LORA, 8, False)
            assert (prompt.kind, prompt.num_virtual_tokens) == (apb.ADAPTER_KIND_PROMPT_TUNING, 7)
            assert lora.num_params > 0 and lora.num_bytes == 4 * lora.num_params
            code, _ = _code(lambda: c.load_adapter("my-lora", "lora"))
            assert code == grpc.StatusCode.ALREADY_EXISTS
            base = c.generate(c.request(token_ids=[5, 6, 7], max_new_tokens=8, ignore_eos=True))
            tuned = c.generate(c.request(token_ids=[5, 6, 7], max_new_tokens=8, ignore_eos=True, adapter_id="my-lora"))
            assert tuned.token_ids != base.token_ids
            listed = {a.adapter_id: a for a in c.list_adapters()}
            assert list(listed) == ["my-lora", "my-prompt"]
            assert listed["my-lora"].requests_served == 1 and listed["my-lora"].location == apb.ADAPTER_LOCATION_DEVICE
            assert listed["my-prompt"].location == apb.ADAPTER_LOCATION_HOST
            c.unload_adapter("my-lora")
            code, _ = _code(lambda: c.generate(c.request(text="a", adapter_id="my-lora")))
            assert code == grpc.StatusCode.NOT_FOUND
    finally:
        running.stop()


def test_load_refuses_paths_outside_the_roots(model_path, tmp_path, root, zoo):
    (root / "escape").symlink_to(zoo["lora"].parent)
    (root / "sneaky").mkdir()
    for f in zoo["lora"].iterdir():
        (root / "sneaky" / f.name).symlink_to(f)
    running = start_server(model_path, tmp_path, adapter_roots=(root,))
    try:
        with QuiverClient(running.target) as c:
            refused = {
                "../root/lora": grpc.StatusCode.INVALID_ARGUMENT,
                str(root / ".." / "root" / "lora"): grpc.StatusCode.INVALID_ARGUMENT,
                str(zoo["lora"]): grpc.StatusCode.PERMISSION_DENIED,
                "escape/lora": grpc.StatusCode.PERMISSION_DENIED,
                "sneaky": grpc.StatusCode.PERMISSION_DENIED,
                "missing": grpc.StatusCode.NOT_FOUND,
            }
            for path, want in refused.items():
                code, details = _code(lambda: c.load_adapter("x", path))
                assert code == want, (path, code, details)
            for bad_id in ("../x", "a/b", "", ".hidden", "a\0b", "x" * 129):
                code, _ = _code(lambda: c.load_adapter(bad_id, "lora"))
                assert code == grpc.StatusCode.INVALID_ARGUMENT, bad_id
            assert c.list_adapters() == []
    finally:
        running.stop()


def test_upload_is_served_and_survives_a_restart(model_path, tmp_path, zoo):
    store = tmp_path / "store"
    running = start_server(model_path, tmp_path, store_dir=store)
    request = dict(token_ids=[9, 10, 11], max_new_tokens=8, ignore_eos=True)
    try:
        with QuiverClient(running.target) as c:
            uploaded = c.upload_adapter("up", zoo["ptuning-v2"])
            assert (uploaded.kind, uploaded.num_virtual_tokens, uploaded.stored) == (apb.ADAPTER_KIND_P_TUNING_V2, 11, True)
            code, _ = _code(lambda: c.upload_adapter("up", zoo["lora"]))
            assert code == grpc.StatusCode.ALREADY_EXISTS
            before = c.generate(c.request(**request, adapter_id="up")).token_ids
    finally:
        running.stop()
    assert _leftovers(store) == [".staging", "up"]
    running = start_server(model_path, tmp_path, store_dir=store)
    try:
        with QuiverClient(running.target) as c:
            assert [(a.adapter_id, a.stored) for a in c.list_adapters()] == [("up", True)]
            assert c.generate(c.request(**request, adapter_id="up")).token_ids == before
            c.upload_adapter("up", zoo["lora"], replace=True)
            assert [a.kind for a in c.list_adapters()] == [apb.ADAPTER_KIND_LORA]
            c.unload_adapter("up")
            assert c.list_adapters() == [] and _leftovers(store) == [".staging"]
    finally:
        running.stop()


def test_failed_and_interrupted_uploads_leave_nothing(model_path, tmp_path, zoo):
    store = tmp_path / "store"
    running = start_server(model_path, tmp_path, store_dir=store, max_upload_bytes=20_000)
    try:
        with QuiverClient(running.target) as c:
            code, details = _code(lambda: c.upload_adapter("big", zoo["lora-all-r4"]))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "20000 bytes" in details
            junk = tmp_path / "junk"
            junk.mkdir()
            (junk / "adapter_config.json").write_text("{not json")
            code, _ = _code(lambda: c.upload_adapter("junk", junk))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            code, _ = _code(lambda: c.adapters.UploadAdapter(iter([apb.UploadAdapterRequest(
                chunk=apb.FileChunk(file_name="a", data=b"x"))])))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            bad_name = [apb.UploadAdapterRequest(header=apb.UploadHeader(adapter_id="n")),
                        apb.UploadAdapterRequest(chunk=apb.FileChunk(file_name="../evil", data=b"x"))]
            code, _ = _code(lambda: c.adapters.UploadAdapter(iter(bad_name)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT

            def interrupted():
                yield apb.UploadAdapterRequest(header=apb.UploadHeader(adapter_id="cut"))
                yield apb.UploadAdapterRequest(chunk=apb.FileChunk(file_name="adapter_config.json", data=b"{"))
                raise ConnectionError("the client died")

            code, _ = _code(lambda: c.adapters.UploadAdapter(interrupted()))
            assert code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)
            assert c.list_adapters() == []
    finally:
        running.stop()
    assert _leftovers(store) == [".staging"]


def test_store_ids_and_crash_leftovers(tmp_path):
    for bad in ("", "..", ".x", "a/b", "a\\b", "a\0b", "x" * 129):
        with pytest.raises(InvalidArgument):
            validate_adapter_id(bad)
    assert validate_adapter_id("my_lora-v1.2") == "my_lora-v1.2"
    store = AdapterStore(tmp_path / "s", max_adapter_bytes=100)
    staged = store.stage("a")
    staged.write(file_name="f", data=b"123")
    assert store.ids() == []
    reopened = AdapterStore(tmp_path / "s", max_adapter_bytes=100)  # as after a crash mid-upload
    assert reopened.ids() == [] and _leftovers(tmp_path / "s") == [".staging"]
