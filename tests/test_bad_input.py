"""A table of malformed requests and adapters. Each one ends with its exact status code and a message that
says what to change; after each, the server still gives the same tokens for the base model and its two
adapters, serves the same adapters, keeps no upload leftovers, and holds nothing beyond idle (tests/support/idle.py).

The server's KV pool (48 blocks of 8 = 384 tokens) is smaller than its 512-token context, so a huge
max_new_tokens is refused instead of being cut at the context length; its --max-lora-rank is 16, its
--max-prompt-bytes 10,000; it takes 2 uploads at once, 150,000 bytes staged, 4 s idle. No message names a
directory of the server (its adapter root, its store).
"""

import contextlib
import os
import pickle
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from quiver.client import QuiverClient
from quiver.v1 import adapters_pb2 as apb
from quiver.v1 import inference_pb2 as pb
from tests.support.adapter_mutations import (
    CONFIG,
    WEIGHTS,
    absurd_header_length,
    both,
    corrupt_header,
    edit_config,
    edit_tensors,
    link_files_out,
    lora_rank,
    remove,
    rename_layer,
    truncate,
    with_entry,
    write,
)
from tests.support.harness import RunningServer, start_server
from tests.support.idle import wait_idle

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXISTS = grpc.StatusCode.ALREADY_EXISTS
DENIED = grpc.StatusCode.PERMISSION_DENIED
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

MAX_UPLOAD = 100_000
MAX_STAGED = 150_000
IDLE_SECONDS = 4
PROMPT_BOUND = "over the server's limit of 10,000 (--max-prompt-bytes)"
LORA_Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"  # [8, 64] in the zoo's LoRA
ID_RULE = "is not valid: use 1 to 128 characters"
KV_REFUSAL = "exceeds the KV cache (384 tokens); ask for fewer"
MALFORMED = "the request message is malformed"
GENERATE = "/quiver.v1.InferenceService/Generate"
UPLOAD = "/quiver.v1.AdapterService/UploadAdapter"


@dataclass
class Ctx:
    running: RunningServer
    client: QuiverClient
    channel: grpc.Channel
    root: Path  # the server's adapter root
    store: Path
    zoo: dict[str, Path]
    baseline: dict[str, list[int]]  # adapter id ("" = base) -> greedy tokens

    def bad(self, name: str, kind: str, mutate: Callable[[Path], None]) -> Path:
        """Zoo adapter `kind` copied to root/name and changed by `mutate(dir)`."""
        path = self.root / name
        if not path.exists():
            shutil.copytree(self.zoo[kind], path)
            mutate(path)
        return path

    def upload(self, path: Path, adapter_id: str = "bad", *, replace: bool = False) -> apb.Adapter:
        return self.client.upload_adapter(adapter_id, path, replace=replace)

    def load(self, path: str, adapter_id: str = "bad") -> apb.Adapter:
        return self.client.load_adapter(adapter_id, path)

    def generate(self, **request) -> pb.GenerateResponse:
        return self.client.generate(self.client.request(**request))

    def raw_generate(self, data: bytes) -> bytes:
        return self.channel.unary_unary(GENERATE)(data, timeout=30)

    def raw_upload(self, messages: list) -> bytes:
        return self.channel.stream_unary(UPLOAD)(iter(messages), timeout=30)


# ---- uploads that go wrong on the wire ---------------------------------------------------------------------------


def header(adapter_id: str, *, replace: bool = False) -> apb.UploadAdapterRequest:
    return apb.UploadAdapterRequest(header=apb.UploadHeader(adapter_id=adapter_id, replace=replace))


def chunk(name: str, data: bytes) -> apb.UploadAdapterRequest:
    return apb.UploadAdapterRequest(chunk=apb.FileChunk(file_name=name, data=data))


def files_of(path: Path) -> list[apb.UploadAdapterRequest]:
    return [chunk(f.name, f.read_bytes()) for f in sorted(path.iterdir())]


def upload_messages(ctx: Ctx, messages: Iterable[apb.UploadAdapterRequest]) -> apb.UploadAdapterResponse:
    return ctx.client.adapters.UploadAdapter(iter(messages), timeout=30)


def cut_off(ctx: Ctx) -> None:
    """The client goes away half-way through the weights file, once the server has written that half."""
    weights = (ctx.zoo["lora"] / WEIGHTS).read_bytes()
    gone = threading.Event()

    def messages() -> Iterator[apb.UploadAdapterRequest]:
        yield header("cut")
        yield chunk(CONFIG, (ctx.zoo["lora"] / CONFIG).read_bytes())
        yield chunk(WEIGHTS, weights[: len(weights) // 2])
        gone.wait(30)

    call = ctx.client.adapters.UploadAdapter.future(messages(), timeout=30)
    staged = ctx.store / ".staging"
    deadline = time.monotonic() + 10
    while not any(f.name == WEIGHTS for d in staged.iterdir() for f in d.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.01)
    call.cancel()
    gone.set()
    raise call  # a finished call is its own RpcError, with the code it ended with


def two_at_once(ctx: Ctx) -> None:
    """Two uploads of one new id whose last chunks arrive together: one is served, the other is refused."""
    barrier = threading.Barrier(2, timeout=20)

    def messages() -> Iterator[apb.UploadAdapterRequest]:
        yield header("twin")
        *first, last = files_of(ctx.zoo["prompt"])
        yield from first
        barrier.wait()
        yield last

    calls = [ctx.client.adapters.UploadAdapter.future(messages(), timeout=30) for _ in range(2)]
    errors = [c.exception(timeout=30) for c in calls]
    assert sum(e is None for e in errors) == 1, errors
    ctx.client.unload_adapter("twin")
    raise next(e for e in errors if e is not None)


def replace_refused(ctx: Ctx) -> None:
    """A replace the engine refuses after the upload was committed leaves the old adapter served and stored."""
    before = {f.name: f.read_bytes() for f in (ctx.store / "lora").iterdir()}
    try:
        ctx.upload(ctx.bad("rank-20", "lora", lora_rank(20)), "lora", replace=True)
    finally:
        assert {f.name: f.read_bytes() for f in (ctx.store / "lora").iterdir()} == before


@contextlib.contextmanager
def held_uploads(ctx: Ctx, sizes: list[int]) -> Iterator[None]:
    """Uploads that stage `sizes` bytes each, then send nothing more; held open inside the block, then cancelled."""
    release = threading.Event()

    def messages(i: int, size: int) -> Iterator[apb.UploadAdapterRequest]:
        yield header(f"held-{i}")
        yield chunk("f", b"\0" * size)
        release.wait(30)

    calls = [ctx.client.adapters.UploadAdapter.future(messages(i, n), timeout=30) for i, n in enumerate(sizes)]
    deadline = time.monotonic() + 10
    while len(list((ctx.store / ".staging").glob("*/f"))) < len(sizes) and time.monotonic() < deadline:
        time.sleep(0.01)  # a file is there once its first chunk is counted
    try:
        yield
    finally:
        for call in calls:
            call.cancel()
        release.set()


def too_many_uploads(ctx: Ctx) -> None:
    with held_uploads(ctx, [10, 10]):
        upload_messages(ctx, [header("third"), *files_of(ctx.zoo["prompt"])])


def over_staged_bytes(ctx: Ctx) -> None:
    with held_uploads(ctx, [90_000]):  # under the upload limit; with the next 70,000 over the staged bytes
        upload_messages(ctx, [header("second"), chunk("f", b"\0" * 70_000)])


def idle_upload(ctx: Ctx) -> None:
    release = threading.Event()

    def messages() -> Iterator[apb.UploadAdapterRequest]:
        yield header("idle")
        yield chunk(CONFIG, b"{}")
        release.wait(30)

    try:
        upload_messages(ctx, messages())
    finally:
        release.set()


def zero_means_256(ctx: Ctx) -> None:
    out = ctx.generate(token_ids=[5, 6], max_new_tokens=0)
    assert 1 <= out.usage.completion_tokens <= 256 and out.finish_reason != pb.FINISH_REASON_UNSPECIFIED


def huge_top_k_keeps_all(ctx: Ctx) -> None:
    out = ctx.generate(token_ids=[5, 6], top_k=2**32 - 1, temperature=1.0, seed=1, max_new_tokens=3, ignore_eos=True)
    assert out.usage.completion_tokens == 3


def n_zero_means_one(ctx: Ctx) -> None:
    out = ctx.generate(token_ids=[7, 8, 9], max_new_tokens=4, ignore_eos=True, n=0)
    assert list(out.token_ids) == list(ctx.baseline[""]) and not out.samples


def twenty_alternatives(ctx: Ctx) -> None:
    out = ctx.generate(token_ids=[5, 6], max_new_tokens=2, ignore_eos=True, top_logprobs=20)
    assert [len(lp.alternatives) for lp in out.logprobs] == [20, 20]


def half_a_character(ctx: Ctx) -> None:
    """A prompt of the first byte of a 3-byte character alone, so its text is not UTF-8: still served."""
    lead = ctx.running.service.engine.tokenizer("世")["input_ids"][0]
    out = ctx.generate(token_ids=[lead, lead, 5], max_new_tokens=4, ignore_eos=True)
    assert out.usage.completion_tokens == 4 and out.text.encode("utf-8")


def negative_max_new_tokens(ctx: Ctx) -> bytes:
    """proto3 has no negative uint32: a client that writes -1 sends a 10-byte varint, read as 2^32 - 1."""
    request = pb.GenerateRequest(prompt=pb.Prompt(token_ids=pb.TokenIds(ids=[5, 6]))).SerializeToString()
    minus_one = b"\x08" + b"\xff" * 9 + b"\x01"  # StoppingCriteria.max_new_tokens = -1
    return ctx.raw_generate(request + b"\x22" + bytes([len(minus_one)]) + minus_one)


# ---- the table -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    call: Callable[[Ctx], object]
    code: grpc.StatusCode
    says: str  # part of the status details (the part a user acts on)


def chat(*messages: pb.ChatMessage) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=pb.Prompt(chat=pb.ChatMessages(messages=messages)))


CASES = [
    # prompts
    Case("no prompt", lambda c: c.client.generate(pb.GenerateRequest()), INVALID, "set one of text, token_ids or chat"),
    Case("empty text", lambda c: c.generate(text=""), INVALID, "the prompt text is empty"),
    Case("empty token ids", lambda c: c.client.generate(pb.GenerateRequest(prompt=pb.Prompt(token_ids=pb.TokenIds()))),
         INVALID, "the prompt is empty"),
    Case("empty chat", lambda c: c.client.generate(chat()), INVALID, "the chat prompt has no messages"),
    Case("chat message without role", lambda c: c.client.generate(chat(pb.ChatMessage(content="hi"))), INVALID,
         "chat message 0 has no role: set system, user or assistant"),
    Case("token prompt longer than the context", lambda c: c.generate(token_ids=[5] * 600), INVALID,
         "the context holds 512 (prompt + output)"),
    Case("text prompt longer than the context", lambda c: c.generate(text="a" * 600), INVALID, "the context holds 512"),
    Case("prompt + default max_new_tokens over the KV cache", lambda c: c.generate(token_ids=[5] * 200), INVALID,
         "prompt + max_new_tokens = 456 tokens " + KV_REFUSAL),
    Case("token id outside the vocabulary", lambda c: c.generate(token_ids=[5, 999]), INVALID,
         "token id 999 is outside the vocabulary [0, 160)"),
    Case("token id 2^32-1", lambda c: c.generate(token_ids=[2**32 - 1]), INVALID, "is outside the vocabulary [0, 160)"),
    Case("token ids that are not UTF-8 text", half_a_character, OK, ""),
    Case("text field not UTF-8 on the wire", lambda c: c.raw_generate(b"\x12\x04\x0a\x02\xff\xfe"), INVALID,
         "String field had bad UTF-8"),
    Case("corrupt request bytes", lambda c: c.raw_generate(b"\xff\xff\xff"), INVALID, MALFORMED),
    Case("text over --max-prompt-bytes", lambda c: c.generate(text="a" * 10_001), INVALID, f"10,001 bytes, {PROMPT_BOUND}"),
    Case("4 MB text (refused before tokenising)", lambda c: c.generate(text="é" * 2_000_000), INVALID,
         f"4,000,000 bytes, {PROMPT_BOUND}"),
    Case("chat over --max-prompt-bytes", lambda c: c.client.generate(chat(*[pb.ChatMessage(
        role=pb.CHAT_ROLE_USER, content="a" * 4_000)] * 3)), INVALID, f"12,000 bytes, {PROMPT_BOUND}"),
    Case("cache_scope over 256 bytes", lambda c: c.client.generate(pb.GenerateRequest(
        prompt=pb.Prompt(token_ids=pb.TokenIds(ids=[5])), cache_scope="s" * 257)), INVALID,
         "cache_scope is 257 bytes; at most 256 are allowed"),
    # stopping and sampling
    Case("max_new_tokens 0 means 256", zero_means_256, OK, ""),
    Case("max_new_tokens huge", lambda c: c.generate(token_ids=[5, 6], max_new_tokens=2**32 - 1), INVALID, KV_REFUSAL),
    Case("max_new_tokens negative on the wire", negative_max_new_tokens, INVALID, KV_REFUSAL),
    Case("temperature negative", lambda c: c.generate(text="a", temperature=-1.0), INVALID,
         "temperature must be a finite number >= 0, got -1.0"),
    Case("temperature NaN", lambda c: c.generate(text="a", temperature=float("nan")), INVALID,
         "temperature must be a finite number >= 0, got nan"),
    Case("temperature infinite", lambda c: c.generate(text="a", temperature=float("inf")), INVALID,
         "temperature must be a finite number >= 0, got inf"),
    Case("top_p 0", lambda c: c.generate(text="a", top_p=0.0), INVALID, "top_p must be in (0, 1], got 0.0"),
    Case("top_p above 1", lambda c: c.generate(text="a", top_p=1.5), INVALID, "top_p must be in (0, 1], got 1.5"),
    Case("top_p negative", lambda c: c.generate(text="a", top_p=-0.5), INVALID, "top_p must be in (0, 1], got -0.5"),
    Case("top_p NaN", lambda c: c.generate(text="a", top_p=float("nan")), INVALID, "top_p must be in (0, 1], got nan"),
    Case("top_k beyond the vocabulary keeps all", huge_top_k_keeps_all, OK, ""),
    Case("seed: the whole uint64 range", lambda c: c.generate(text="a", seed=2**64 - 1, temperature=1.0), OK, ""),
    Case("empty stop string", lambda c: c.generate(text="a", stop=("",)), INVALID, "stop_strings must be non-empty strings"),
    Case("min_new_tokens over max_new_tokens", lambda c: c.generate(text="a", max_new_tokens=5, min_new_tokens=10),
         INVALID, "min_new_tokens must be an integer in [0, max_new_tokens = 5], got 10"),
    Case("min_new_tokens over the default max_new_tokens", lambda c: c.generate(text="a", min_new_tokens=300), INVALID,
         "min_new_tokens must be an integer in [0, max_new_tokens = 256], got 300"),
    Case("repetition_penalty 0", lambda c: c.generate(text="a", repetition_penalty=0.0), INVALID,
         "repetition_penalty must be a finite number > 0 (1: none), got 0.0"),
    Case("repetition_penalty negative", lambda c: c.generate(text="a", repetition_penalty=-1.0), INVALID,
         "repetition_penalty must be a finite number > 0 (1: none), got -1.0"),
    Case("repetition_penalty NaN", lambda c: c.generate(text="a", repetition_penalty=float("nan")), INVALID,
         "repetition_penalty must be a finite number > 0 (1: none), got nan"),
    Case("repetition_penalty infinite", lambda c: c.generate(text="a", repetition_penalty=float("inf")), INVALID,
         "repetition_penalty must be a finite number > 0 (1: none), got inf"),
    Case("presence_penalty above 2", lambda c: c.generate(text="a", presence_penalty=2.5), INVALID,
         "presence_penalty must be in [-2, 2], got 2.5"),
    Case("presence_penalty NaN", lambda c: c.generate(text="a", presence_penalty=float("nan")), INVALID,
         "presence_penalty must be in [-2, 2], got nan"),
    Case("frequency_penalty below -2", lambda c: c.generate(text="a", frequency_penalty=-3.0), INVALID,
         "frequency_penalty must be in [-2, 2], got -3.0"),
    Case("frequency_penalty NaN", lambda c: c.generate(text="a", frequency_penalty=float("nan")), INVALID,
         "frequency_penalty must be in [-2, 2], got nan"),
    Case("top_logprobs 21", lambda c: c.generate(text="a", top_logprobs=21), INVALID,
         "top_logprobs must be in [0, 20], got 21"),
    Case("top_logprobs 2^32-1", lambda c: c.generate(text="a", top_logprobs=2**32 - 1), INVALID,
         "top_logprobs must be in [0, 20], got 4294967295"),
    Case("top_logprobs 20 is accepted", twenty_alternatives, OK, ""),
    Case("n 17", lambda c: c.generate(text="a", n=17), INVALID, "n (samples) must be in [1, 16] (0 means 1), got 17"),
    Case("n 2^32-1", lambda c: c.generate(text="a", n=2**32 - 1), INVALID, "must be in [1, 16] (0 means 1), got 4294967295"),
    Case("n 0 means 1", n_zero_means_one, OK, ""),
    # adapter ids
    Case("unknown adapter", lambda c: c.generate(text="a", adapter_id="nope"), NOT_FOUND, "no adapter 'nope' is loaded"),
    Case("generate: id with a slash", lambda c: c.generate(text="a", adapter_id="a/b"), INVALID, ID_RULE),
    Case("generate: id with ..", lambda c: c.generate(text="a", adapter_id="../lora"), INVALID, ID_RULE),
    Case("generate: id with NUL", lambda c: c.generate(text="a", adapter_id="lora\0"), INVALID, ID_RULE),
    Case("generate: 10 kB id", lambda c: c.generate(text="a", adapter_id="x" * 10_000), INVALID, ID_RULE),
    Case("load: id with a slash", lambda c: c.load("lora-ok", "a/b"), INVALID, ID_RULE),
    Case("load: id with ..", lambda c: c.load("lora-ok", ".."), INVALID, ID_RULE),
    Case("load: id with NUL", lambda c: c.load("lora-ok", "a\0b"), INVALID, ID_RULE),
    Case("load: 10 kB id", lambda c: c.load("lora-ok", "x" * 10_000), INVALID, ID_RULE),
    Case("upload: id with a slash", lambda c: c.upload(c.zoo["lora"], "x/../../y"), INVALID, ID_RULE),
    Case("unload unknown adapter", lambda c: c.client.unload_adapter("nope"), NOT_FOUND, "no adapter 'nope' is loaded"),
    Case("load an id already served", lambda c: c.load("prefix", "prefix"), EXISTS, "ask for replacement"),
    Case("upload an id already served", lambda c: c.upload(c.zoo["lora"], "lora"), EXISTS, "ask for replacement"),
    # paths
    Case("load: path with ..", lambda c: c.load("../root/lora-ok"), INVALID, "may not contain '..'"),
    Case("load: path outside the roots", lambda c: c.load("/etc"), DENIED, "outside the server's adapter roots"),
    Case("load: symlink out of the root", lambda c: c.load("escape"), DENIED, "outside the server's adapter roots"),
    Case("load: files symlinked out of the root", lambda c: c.load(c.bad("linked", "lora", link_files_out).name), DENIED,
         "links outside the server's adapter roots"),
    Case("load: path with NUL", lambda c: c.load("lora-ok\0"), INVALID, "contains a NUL character"),
    Case("load: no such directory", lambda c: c.load("missing"), NOT_FOUND, "no adapter directory at 'missing'"),
    Case("load: 5,000-character path", lambda c: c.load("a" * 5_000), INVALID, "is too long for the server's filesystem"),
    # adapter files
    Case("truncated safetensors", lambda c: c.upload(c.bad("truncated", "lora", truncate)), INVALID,
         "not a valid safetensors file"),
    Case("corrupt safetensors header", lambda c: c.load(c.bad("corrupt", "lora", corrupt_header).name), INVALID,
         "not a valid safetensors file"),
    Case("safetensors header length 2^62", lambda c: c.upload(c.bad("absurd-header", "lora", absurd_header_length)),
         INVALID, "not a valid safetensors file"),
    Case("wrong tensor shape", lambda c: c.upload(c.bad("shape", "lora", edit_tensors(
        lambda t: {**t, LORA_Q_A: torch.zeros(8, 65)}))), INVALID, "has shape [8, 65], this base model needs [8, 64]"),
    Case("NaN weight", lambda c: c.upload(c.bad("nan", "lora", edit_tensors(with_entry(LORA_Q_A, torch.tensor(float("nan")))))),
         INVALID, "holds non-finite values (NaN or inf)"),
    Case("infinite weight", lambda c: c.upload(c.bad("inf", "bottleneck", edit_tensors(
        with_entry("base_model.model.model.layers.1.mlp_adapter.up.bias", torch.tensor(float("inf")))))),
         INVALID, "holds non-finite values (NaN or inf)"),
    Case("integer weights", lambda c: c.upload(c.bad("int", "prompt", edit_tensors(
        lambda t: {k: v.to(torch.int64) for k, v in t.items()}))), INVALID, "is I64; expected one of"),
    Case("rank 0", lambda c: c.upload(c.bad("rank-0", "lora", edit_config(r=0))), INVALID,
         "r must be an integer >= 1, got 0"),
    Case("rank 10^9", lambda c: c.upload(c.bad("rank-absurd", "lora", edit_config(r=10**9))), INVALID,
         "rank 1000000000 of model.layers.0.mlp.down_proj exceeds min(in, out) = 64"),
    Case("rank over the server's limit", lambda c: c.upload(c.bad("rank-20", "lora", lora_rank(20))), INVALID,
         "LoRA rank 20 exceeds this server's --max-lora-rank 16"),
    Case("a refused replace keeps the old adapter", replace_refused, INVALID, "--max-lora-rank 16"),
    Case("hidden size of another model", lambda c: c.upload(c.bad("hidden", "prompt", both(
        edit_config(token_dim=128), edit_tensors(lambda t: {"prompt_embeddings": torch.zeros(7, 128)})))), INVALID,
         "token_dim is 128, this base model's hidden size is 64"),
    Case("layer count of another model", lambda c: c.upload(c.bad("layers", "ptuning-v2", edit_config(num_layers=4))),
         INVALID, "num_layers is 4, this base model needs 2 (another architecture?)"),
    Case("LoRA on a layer the model lacks", lambda c: c.upload(c.bad("layer-5", "lora", edit_tensors(
        rename_layer("layers.1.", "layers.5.")))), INVALID, "Quiver serves LoRA only on the base model's decoder linear layers"),
    Case("unknown peft_type", lambda c: c.upload(c.bad("ia3", "lora", edit_config(peft_type="IA3"))), INVALID,
         "unknown peft_type 'IA3'; expected one of"),
    Case("option that cannot be served (DoRA)", lambda c: c.upload(c.bad("dora", "lora", edit_config(use_dora=True))),
         INVALID, "cannot be served exactly; train without it"),
    Case("malformed JSON", lambda c: c.upload(c.bad("json", "lora", write(CONFIG, b"{\"r\": 8,"))), INVALID,
         "malformed JSON"),
    Case("JSON that is not an object", lambda c: c.upload(c.bad("json-list", "lora", write(CONFIG, b"[1, 2]"))), INVALID,
         "must hold a JSON object, not list"),
    Case("no adapter_config.json", lambda c: c.upload(c.bad("no-config", "lora", remove(CONFIG))), INVALID,
         "adapter_config.json: missing"),
    Case("pickled .bin weights only", lambda c: c.upload(c.bad("pickled", "lora", both(
        remove(WEIGHTS), write("adapter_model.bin", pickle.dumps({"x": 1}))))), INVALID,
         "pickled weights are refused (unpickling can run arbitrary code)"),
    Case("more virtual tokens than the KV cache", lambda c: c.load(c.bad("long-prompt", "prompt", both(
        edit_config(num_virtual_tokens=400), edit_tensors(lambda t: {"prompt_embeddings": torch.zeros(400, 64)}))).name),
         INVALID, "400 virtual tokens do not fit the KV cache"),
    # uploads
    Case("upload over the size limit", lambda c: c.upload(c.bad("rank-64", "lora", lora_rank(64))), EXHAUSTED,
         f"the upload exceeds the server's limit of {MAX_UPLOAD} bytes"),
    Case("upload without a header", lambda c: upload_messages(c, files_of(c.zoo["lora"])), INVALID,
         "an upload starts with its header"),
    Case("upload with two headers", lambda c: upload_messages(c, [header("h"), header("h")]), INVALID,
         "only file chunks may follow an upload's header"),
    Case("upload file name with a path", lambda c: upload_messages(c, [header("p"), chunk("../evil", b"x")]), INVALID,
         "file name '../evil' is not valid"),
    Case("upload file name with NUL", lambda c: upload_messages(c, [header("p"), chunk("a\0b", b"x")]), INVALID,
         "is not valid: a plain name"),
    Case("upload with no files", lambda c: upload_messages(c, [header("empty")]), INVALID, "the upload has no files"),
    Case("upload splitting a file", lambda c: upload_messages(c, [header("s"), chunk("a", b"1"), chunk("b", b"2"),
                                                                 chunk("a", b"3")]), INVALID, "two separate runs of chunks"),
    Case("upload of 17 files", lambda c: upload_messages(c, [header("many"), *(chunk(f"f{i}", b"x") for i in range(17))]),
         INVALID, "an adapter has at most 16 files"),
    Case("upload message not UTF-8 on the wire", lambda c: c.raw_upload([b"\x0a\x04\x0a\x02\xff\xfe"]), INVALID,
         "String field had bad UTF-8"),
    Case("upload cut off half-way", cut_off, grpc.StatusCode.CANCELLED, ""),
    Case("two uploads of one id at once", two_at_once, EXISTS, "'twin' is already stored; ask for replacement"),
    Case("more uploads at once than --max-concurrent-uploads", too_many_uploads, EXHAUSTED,
         "2 uploads are in progress, the most this server takes at once (its --max-concurrent-uploads)"),
    Case("uploads staging more than --max-staged-bytes", over_staged_bytes, EXHAUSTED,
         f"would stage more than the server's limit of {MAX_STAGED} bytes (its --max-staged-bytes)"),
    Case("upload idle for --upload-idle-seconds", idle_upload, EXHAUSTED,
         f"the upload sent nothing for {IDLE_SECONDS} s (the server's --upload-idle-seconds)"),
]


@pytest.fixture(scope="module")
def ctx(model_path, zoo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-input")
    root = tmp / "root"
    root.mkdir()
    for kind in ("lora", "prefix"):
        shutil.copytree(zoo[kind], root / ("lora-ok" if kind == "lora" else kind))
    (root / "escape").symlink_to(zoo["lora"])
    running = start_server(model_path, tmp, adapter_roots=(root,), max_upload_bytes=MAX_UPLOAD, max_prompt_bytes=10_000,
                           max_concurrent_uploads=2, max_staged_bytes=MAX_STAGED, upload_idle_seconds=IDLE_SECONDS,
                           engine={"num_kv_blocks": 48, "max_lora_rank": 16})
    client = QuiverClient(running.target, timeout=60)
    client.upload_adapter("lora", zoo["lora"])
    client.load_adapter("prefix", "prefix")
    baseline = {a: client.generate(client.request(token_ids=[7, 8, 9], max_new_tokens=4, ignore_eos=True,
                                                  adapter_id=a)).token_ids for a in ("", "lora", "prefix")}
    with grpc.insecure_channel(running.target) as channel:
        yield Ctx(running, client, channel, root, tmp / "store", zoo, baseline)
    client.close()
    running.stop()


def outcome(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return OK, ""


def test_the_table_is_at_least_40_inputs():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_and_leaves_the_server_as_it_was(case, ctx):
    code, details = outcome(lambda: case.call(ctx))
    assert code == case.code and case.says in details, (code, details)
    assert len(details) < 400, "a message that echoes the input back whole"
    assert str(ctx.root.parent) not in details, "a message that names where the server keeps files"
    assert_as_before(ctx)


def assert_as_before(ctx: Ctx) -> None:
    c = ctx.client
    for adapter_id, tokens in ctx.baseline.items():
        out = c.generate(c.request(token_ids=[7, 8, 9], max_new_tokens=4, ignore_eos=True, adapter_id=adapter_id))
        assert out.token_ids == tokens, adapter_id
    assert [(a.adapter_id, a.stored) for a in c.list_adapters()] == [("lora", True), ("prefix", False)]
    deadline = time.monotonic() + 5  # a cancelled upload is cleaned up as the server sees the cancellation
    while os.listdir(ctx.store / ".staging") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sorted(os.listdir(ctx.store)) == [".staging", "lora"] and os.listdir(ctx.store / ".staging") == []
    assert wait_idle(ctx.running.service) == []
