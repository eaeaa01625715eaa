"""Who may call what, where adapters may be read from, what is never done with an adapter's bytes, and how
much a client may store. The threat model these check is docs/security.md."""

import pickle
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from quiver.api.cache_scope import CacheScope
from quiver.cli import build_parser, read_tokens
from quiver.client import QuiverClient
from quiver.errors import QuiverError
from quiver.v1 import adapters_pb2 as apb
from quiver.v1 import inference_pb2
from tests.support.harness import health, start_server

ROOT = Path(__file__).resolve().parents[1]
ADMIN, CLIENT = "admin-secret", "client-secret"
UNAUTHENTICATED, DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
ADMIN_METHODS = {"LoadAdapter", "UploadAdapter", "UnloadAdapter"}


def _methods() -> list[tuple[str, str, bool]]:
    """(full method name, short name, client-streaming) of every quiver.v1 RPC, from the protos."""
    found = []
    for file in (inference_pb2.DESCRIPTOR, apb.DESCRIPTOR):
        for service in file.services_by_name.values():
            for m in service.methods:
                found.append((f"/{service.full_name}/{m.name}", m.name, m.client_streaming))
    return found


def _call(channel: grpc.Channel, method: str, streaming: bool, token: str | None) -> grpc.StatusCode:
    """Call `method` with an empty request (bytes as they are) and return its status code."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        if streaming:
            channel.stream_unary(method)(iter([b""]), metadata=metadata, timeout=30)
        else:
            channel.unary_unary(method)(b"", metadata=metadata, timeout=30)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _verdict(code: grpc.StatusCode) -> str:
    return {UNAUTHENTICATED: "unauthenticated", DENIED: "denied"}.get(code, "allowed")


def _expected(method: str, token: str | None, *, admin: str | None, client: str | None) -> str:
    """The rules of server/api/auth.py: an admin method needs the admin token if there is one, else the client
    token if there is one; any other method needs the client token (or the admin token) if there is one."""
    needed = admin if method in ADMIN_METHODS and admin else client
    if needed is None:
        return "allowed"
    if token is not None and (token == needed or (method not in ADMIN_METHODS and token == admin)):
        return "allowed"
    if token is not None and method in ADMIN_METHODS and token == client:
        return "denied"
    return "unauthenticated"


@pytest.mark.parametrize("admin_token, client_token", [(ADMIN, CLIENT), (ADMIN, None), (None, CLIENT)])
def test_every_method_checks_its_token(model_path, tmp_path, admin_token, client_token):  # noqa: F811
    """Every RPC, with no, a wrong, the client and the admin token; the call's own errors (an empty request
    is invalid for most) count as "allowed": they come after auth."""
    running = start_server(model_path, tmp_path, admin_token=admin_token, client_tokens=(client_token,) if client_token else ())
    try:
        with grpc.insecure_channel(running.target) as channel:
            for method, name, streaming in _methods():
                for token in (None, "wrong", CLIENT, ADMIN):
                    want = _expected(name, token, admin=admin_token, client=client_token)
                    assert _verdict(_call(channel, method, streaming, token)) == want, (name, token)
            assert _call(channel, "/quiver.v1.InferenceService/Generate", False, None) == (
                UNAUTHENTICATED if client_token else grpc.StatusCode.INVALID_ARGUMENT)
            corrupt = channel.unary_unary("/quiver.v1.InferenceService/Generate")
            with pytest.raises(grpc.RpcError) as e:  # auth is checked before the message is looked at
                corrupt(b"\xff\xff\xff", timeout=30)
            assert e.value.code() == (UNAUTHENTICATED if client_token else grpc.StatusCode.INVALID_ARGUMENT)
        assert health(running.target) == 1  # SERVING: health needs no token
        assert running.server.state.adapter_kinds == {} and list((tmp_path / "store" / ".staging").iterdir()) == []
    finally:
        running.stop()


@pytest.fixture
def roots(tmp_path, zoo):  # noqa: F811
    """Two adapter roots, and things around them that loads must not reach."""
    first, second, outside = tmp_path / "root-a", tmp_path / "root-b", tmp_path / "outside"
    for d in (first, second, outside):
        d.mkdir()
    shutil.copytree(zoo["lora"], first / "lora")
    shutil.copytree(zoo["prompt"], second / "prompt")
    shutil.copytree(zoo["lora"], outside / "lora")
    (first / "dir-link-out").symlink_to(outside / "lora")
    (first / "dir-link-in").symlink_to(second / "prompt")
    (first / "files-out").mkdir()
    (first / "files-in").mkdir()
    for f in zoo["lora"].iterdir():
        (first / "files-out" / f.name).symlink_to(outside / "lora" / f.name)
        (first / "files-in" / f.name).symlink_to(first / "lora" / f.name)
    (first / "root-link").symlink_to(tmp_path)
    return first, second, outside


def test_loads_are_confined_to_the_adapter_roots(model_path, tmp_path, roots):  # noqa: F811
    first, second, outside = roots
    running = start_server(model_path, tmp_path, adapter_roots=(first, second))
    cases = {
        "lora": grpc.StatusCode.OK,
        str(second / "prompt"): grpc.StatusCode.OK,  # an absolute path in the second root
        "dir-link-in": grpc.StatusCode.OK,  # a symlink from one root into another
        "files-in": grpc.StatusCode.INVALID_ARGUMENT,  # an adapter's files must lie in its own directory
        "../outside/lora": grpc.StatusCode.INVALID_ARGUMENT,
        "lora/../lora": grpc.StatusCode.INVALID_ARGUMENT,
        str(first / ".." / "outside" / "lora"): grpc.StatusCode.INVALID_ARGUMENT,
        str(outside / "lora"): DENIED,
        "dir-link-out": DENIED,
        "files-out": DENIED,
        "root-link/outside/lora": DENIED,
        "/": DENIED,
        "/proc/self": DENIED,
        "": grpc.StatusCode.INVALID_ARGUMENT,
    }
    try:
        with QuiverClient(running.target) as c:
            for i, (path, want) in enumerate(cases.items()):
                try:
                    c.load_adapter(f"a{i}", path)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as e:
                    code = e.code()
                    assert str(outside) not in e.details() or path.startswith(str(outside)), e.details()
                assert code == want, (path, code)
            assert len(c.list_adapters()) == 3
    finally:
        running.stop()


def test_uploads_cannot_write_outside_the_store(model_path, tmp_path, zoo):  # noqa: F811
    running = start_server(model_path, tmp_path)
    before = sorted(p for p in tmp_path.rglob("*") if "store" not in p.parts)
    try:
        with QuiverClient(running.target) as c:
            for adapter_id in ("../escape", "/tmp/escape", "a/b", ".staging", ".previous.x", "..", "a\\b"):
                with pytest.raises(grpc.RpcError) as e:
                    c.upload_adapter(adapter_id, zoo["lora"])
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, adapter_id
            for name in ("../escape", "/tmp/escape", "sub/file", ".hidden", "..", "a\0b"):
                messages = [apb.UploadAdapterRequest(header=apb.UploadHeader(adapter_id="n")),
                            apb.UploadAdapterRequest(chunk=apb.FileChunk(file_name=name, data=b"x"))]
                with pytest.raises(grpc.RpcError) as e:
                    c.adapters.UploadAdapter(iter(messages), timeout=30)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
    finally:
        running.stop()
    assert sorted(p for p in tmp_path.rglob("*") if "store" not in p.parts) == before
    assert not Path("/tmp/escape").exists()
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [".staging"]


# ---- nothing is unpickled ----------------------------------------------------------------------------------------

_UNPICKLING = re.compile(
    r"torch\.load\(|torch\.jit\.load|pickle\.loads?\(|Unpickler|weights_only\s*=\s*False|allow_pickle\s*=\s*True"
    r"|import (?:c?pickle|dill|joblib|cloudpickle|shelve|marshal)\b|np\.load\(|numpy\.load\(|trust_remote_code\s*=\s*True"
)


def test_no_code_path_unpickles():
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for package in ("server", "kernels", "trainer")
        for path in sorted((ROOT / package).rglob("*.py"))
        if "gen" not in path.relative_to(ROOT).parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if _UNPICKLING.search(line)
    ]
    assert hits == []


class _Payload:
    """Unpickling this creates the file `path`: the proof that something unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickled_adapter_files_are_never_unpickled(model_path, tmp_path, zoo, monkeypatch):  # noqa: F811
    marker = tmp_path / "pwned"
    root = tmp_path / "root"
    payload = pickle.dumps({"base_model.model.x": _Payload(marker)})
    only_bin = root / "only-bin"
    shutil.copytree(zoo["lora"], only_bin)
    (only_bin / "adapter_model.safetensors").unlink()
    (only_bin / "adapter_model.bin").write_bytes(payload)
    disguised = root / "disguised"
    shutil.copytree(zoo["lora"], disguised)
    (disguised / "adapter_model.safetensors").write_bytes(payload)
    beside = root / "beside"  # a valid adapter with a pickle next to it: served, the pickle ignored
    shutil.copytree(zoo["lora"], beside)
    (beside / "adapter_model.bin").write_bytes(payload)
    (beside / "training_args.pt").write_bytes(payload)

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling was attempted")

    for target, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(target, name, refuse)
    running = start_server(model_path, tmp_path, adapter_roots=(root,))
    try:
        with QuiverClient(running.target) as c:
            for name, says in (("only-bin", "pickled weights are refused"), ("disguised", "not a valid safetensors file")):
                for send in (lambda: c.load_adapter(name, name), lambda: c.upload_adapter(name, root / name)):
                    with pytest.raises(grpc.RpcError) as e:
                        send()
                    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and says in e.value.details()
            assert c.load_adapter("beside", "beside").kind == apb.ADAPTER_KIND_LORA
            assert c.upload_adapter("beside-up", beside).kind == apb.ADAPTER_KIND_LORA
    finally:
        running.stop()
    assert not marker.exists()


# ---- limits --------------------------------------------------------------------------------------------------------


def test_upload_size_limit_stops_a_stream_at_the_limit(model_path, tmp_path):  # noqa: F811
    limit = 50_000
    running = start_server(model_path, tmp_path, max_upload_bytes=limit)
    sent = []

    def messages():
        yield apb.UploadAdapterRequest(header=apb.UploadHeader(adapter_id="big"))
        for i in range(20):  # 5x the limit, over two files
            sent.append(i)
            yield apb.UploadAdapterRequest(chunk=apb.FileChunk(file_name=f"f{i // 10}", data=b"\0" * (limit // 4)))

    try:
        with QuiverClient(running.target) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.adapters.UploadAdapter(messages(), timeout=30)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"the upload exceeds the server's limit of {limit} bytes" in e.value.details()
            assert c.list_adapters() == [] and c.server_info().limits.max_upload_bytes == limit
    finally:
        running.stop()
    assert sorted(p.name for p in (tmp_path / "store").rglob("*")) == [".staging"]


def test_upload_count_limit(model_path, tmp_path, zoo):  # noqa: F811
    root = tmp_path / "root"
    shutil.copytree(zoo["prefix"], root / "prefix")
    running = start_server(model_path, tmp_path, max_stored_adapters=2, adapter_roots=(root,))
    try:
        with QuiverClient(running.target) as c:
            c.upload_adapter("a", zoo["lora"])
            c.upload_adapter("b", zoo["prompt"])
            c.load_adapter("from-disk", "prefix")  # loads from a root take no room in the store

            sent_files = threading.Event()

            def third():  # refused at the header: the answer comes while the files are held back
                yield apb.UploadAdapterRequest(header=apb.UploadHeader(adapter_id="c"))
                sent_files.wait(30)

            with pytest.raises(grpc.RpcError) as e:
                c.adapters.UploadAdapter(third(), timeout=20)
            sent_files.set()
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "the adapter store is full (2 adapters, the server's --max-stored-adapters)" in e.value.details()
            assert c.upload_adapter("a", zoo["bottleneck"], replace=True).kind == apb.ADAPTER_KIND_BOTTLENECK
            c.unload_adapter("b")
            assert c.upload_adapter("c", zoo["prompt"]).stored
            assert sorted(a.adapter_id for a in c.list_adapters()) == ["a", "c", "from-disk"]
    finally:
        running.stop()
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [".staging", "a", "c"]


def test_the_cli_sets_the_count_limit():
    assert build_parser().parse_args(["serve", "--max-stored-adapters", "3"]).max_stored_adapters == 3
    assert build_parser().parse_args(["serve"]).max_stored_adapters == 1024


# ---- several clients, and what one can learn of another's prompts ------------------------------------------------

SECRET = [(7 * i) % 150 + 3 for i in range(40)]  # 5 blocks of 8 tokens: a template with a secret in it
A, B = "client-a", "client-b"


def _hits(running, token: str | None, *, cache_scope: str = "") -> int:
    """Prefix-cache hit tokens of one request for SECRET sent with `token` (and `cache_scope`)."""
    before = running.service.stats()
    with QuiverClient(running.target, token=token) as c:
        request = c.request(token_ids=SECRET, max_new_tokens=1)
        request.cache_scope = cache_scope
        c.generate(request)
    deadline = time.monotonic() + 10  # the engine's stats are published after the step that answered
    while running.service.stats().prefix_cache_queried_tokens < before.prefix_cache_queried_tokens + len(SECRET):
        assert time.monotonic() < deadline, "the request was not counted"
        time.sleep(0.01)
    return running.service.stats().prefix_cache_hit_tokens - before.prefix_cache_hit_tokens


def test_per_token_scope_shares_no_cached_blocks_between_clients(model_path, tmp_path):
    """The default: client B sending client A's exact prompt (a right guess of A's secret) reuses none of A's
    blocks, so its first token comes no sooner than for a wrong guess. The same client, or clients that name
    the same cache_scope, do share."""
    running = start_server(model_path, tmp_path, client_tokens=(A, B), admin_token=ADMIN)
    try:
        assert _hits(running, A) == 0  # cold
        assert _hits(running, B) == 0  # A's blocks are not B's
        assert _hits(running, ADMIN) == 0  # nor the admin's
        assert _hits(running, A) == 32  # A's own: all but the last block, whose KV the first token needs
        assert _hits(running, A, cache_scope="team") == 0
        assert _hits(running, B, cache_scope="team") == 32  # one named scope, whoever sends it
        assert _hits(running, B, cache_scope="other") == 0
    finally:
        running.stop()


def test_global_scope_shares_cached_blocks_between_clients(model_path, tmp_path):
    running = start_server(model_path, tmp_path, client_tokens=(A, B), prefix_cache_scope=CacheScope.GLOBAL)
    try:
        assert _hits(running, A) == 0
        assert _hits(running, B) == 32
        assert _hits(running, B, cache_scope="team") == 0  # a named scope is its own under either setting
    finally:
        running.stop()


def test_without_client_tokens_every_caller_is_one_party(model_path, tmp_path):
    """No client token is checked, so a bearer token proves nothing: it does not make a scope of its own."""
    running = start_server(model_path, tmp_path)
    try:
        assert _hits(running, None) == 0
        assert _hits(running, "made-up") == 32
    finally:
        running.stop()


def test_a_cache_scope_name_is_bounded(model_path, tmp_path):
    running = start_server(model_path, tmp_path)
    try:
        with pytest.raises(grpc.RpcError) as e:
            _hits(running, None, cache_scope="x" * 257)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 256" in e.value.details()
        assert _hits(running, None, cache_scope="x" * 256) == 0
    finally:
        running.stop()


def test_a_client_token_file_holds_several_clients(model_path, tmp_path):
    tokens = tmp_path / "clients"
    tokens.write_text(f"# one token a line\n\n  {A}  \n# {B} is not a token\n{B}\n")
    args = build_parser().parse_args(["serve", "--client-token-file", str(tokens)])
    assert read_tokens(args.client_token_file) == (A, B)
    assert args.prefix_cache_scope == "per-token" and args.metrics_host == "127.0.0.1"
    (tmp_path / "empty").write_text("# none\n\n")
    with pytest.raises(QuiverError, match="holds no token"):
        read_tokens(tmp_path / "empty")
    running = start_server(model_path, tmp_path, client_tokens=read_tokens(tokens))
    try:
        for token in (A, B):
            with QuiverClient(running.target, token=token) as c:
                assert c.generate(c.request(token_ids=[5, 6], max_new_tokens=2, ignore_eos=True)).usage.completion_tokens == 2
        for token in (None, f"# {B} is not a token", "one token a line"):
            with QuiverClient(running.target, token=token) as c:
                with pytest.raises(grpc.RpcError) as e:
                    c.list_adapters()
                assert e.value.code() == UNAUTHENTICATED
    finally:
        running.stop()


# ---- the metrics endpoint ----------------------------------------------------------------------------------------


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except ConnectionRefusedError:
        return False


@pytest.mark.parametrize("metrics_host, outside", [(None, False), ("0.0.0.0", True)])
def test_metrics_listen_on_loopback_unless_asked(model_path, tmp_path, metrics_host, outside):
    """/metrics is plain HTTP without a token: it listens on 127.0.0.1 even when gRPC listens on every
    interface, unless --metrics-host says otherwise. 127.0.0.2 stands for another interface's address."""
    config = {"metrics_host": metrics_host} if metrics_host else {}
    running = start_server(model_path, tmp_path, host="0.0.0.0", **config)
    try:
        assert _reachable("127.0.0.2", running.server.port)  # gRPC: every interface
        assert _reachable("127.0.0.1", running.server.metrics_port)
        assert _reachable("127.0.0.2", running.server.metrics_port) == outside
    finally:
        running.stop()
