"""The Node.js client of docs/clients.md, built from the .proto files alone, works against a real server:
it uploads an adapter (header, then chunks, an empty file as one empty chunk), lists it, and streams with
it the same tokens the Python client gets; with tokens set it sends its bearer token, and a refusal reaches
it as the gRPC status. Runs where `node` and `npm` are present (npm fetches @grpc/grpc-js once per session)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from quiver.client import QuiverClient
from tests.support.harness import start_server

CLIENT = Path(__file__).resolve().parents[2] / "docs" / "clients"
PROTOS = Path(__file__).resolve().parents[2] / "protos"

pytestmark = pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None, reason="needs node and npm")


@pytest.fixture(scope="module")
def client_dir(tmp_path_factory) -> Path:
    """docs/clients/ with its npm dependencies installed, in a scratch folder."""
    folder = tmp_path_factory.mktemp("node-client")
    for name in ("package.json", "quiver.js"):
        shutil.copy(CLIENT / name, folder / name)
    try:
        done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=folder, check=False,
                              capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.skip("npm could not install @grpc/grpc-js within 180 s (no registry?)")
    if done.returncode != 0:
        pytest.skip(f"npm could not install @grpc/grpc-js (no registry?): {done.stderr[-500:]}")
    return folder


def _node(client_dir: Path, target: str, *args: str, token: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "QUIVER_SERVER": target, "QUIVER_PROTOS": str(PROTOS)}
    env.pop("QUIVER_TOKEN", None)
    if token is not None:
        env["QUIVER_TOKEN"] = token
    return subprocess.run(["node", str(client_dir / "quiver.js"), *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_node_client_uploads_lists_and_streams_like_the_python_client(client_dir, model_path, zoo, tmp_path):
    adapter = tmp_path / "lora"
    shutil.copytree(zoo["lora"], adapter)
    (adapter / "README.md").write_bytes(b"")  # an empty file: sent as one empty chunk
    running = start_server(model_path, tmp_path)
    try:
        uploaded = _node(client_dir, running.target, "upload", "node-lora", str(adapter))
        assert uploaded.returncode == 0, uploaded.stderr
        response = json.loads(uploaded.stdout)
        assert response["adapter"]["adapter_id"] == "node-lora" and response["adapter"]["kind"] == "ADAPTER_KIND_LORA"
        assert int(response["bytes_received"]) == sum(f.stat().st_size for f in adapter.iterdir())
        listed = _node(client_dir, running.target, "list")
        assert [a["adapter_id"] for a in json.loads(listed.stdout)] == ["node-lora"]

        streamed = _node(client_dir, running.target, "stream", "hello there", "--adapter", "node-lora",
                         "--max-new-tokens", "12", "--json")
        assert streamed.returncode == 0, streamed.stderr
        messages = [json.loads(line) for line in streamed.stdout.splitlines()]
        with QuiverClient(running.target) as c:
            expected = c.generate(c.request(text="hello there", adapter_id="node-lora", max_new_tokens=12))
        assert [t for m in messages for t in m["token_ids"]] == list(expected.token_ids)
        assert "".join(m["text"] for m in messages) == expected.text
        assert messages[-1]["finish_reason"] == "FINISH_REASON_LENGTH"
        assert len({m["request_id"] for m in messages}) == 1 and messages[0]["request_id"]

        missing = _node(client_dir, running.target, "stream", "hi", "--adapter", "nope")
        assert missing.returncode == 1 and missing.stderr.startswith("NOT_FOUND: ")
    finally:
        running.stop()


def test_node_client_sends_its_token(client_dir, model_path, tmp_path):
    running = start_server(model_path, tmp_path, client_tokens=("node-secret",))
    try:
        refused = _node(client_dir, running.target, "list")
        assert refused.returncode == 1 and refused.stderr.startswith("UNAUTHENTICATED: ")
        allowed = _node(client_dir, running.target, "stream", "hi", "--max-new-tokens", "3", token="node-secret")
        assert allowed.returncode == 0, allowed.stderr
    finally:
        running.stop()
