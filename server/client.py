"""A small synchronous Python client of a Quiver server (the `quiver` CLI uses it).

    with QuiverClient("127.0.0.1:50051") as client:
        for piece in client.generate_stream(client.request(chat="Hi!", max_new_tokens=32)):
            print(piece.text, end="")
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Self

import grpc

from quiver.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc

CHUNK_BYTES = 1 << 20  # upload chunk size, well under gRPC's 4 MiB message limit


class QuiverClient:
    def __init__(
        self, target: str, *, token: str | None = None, tls_ca: Path | None = None, timeout: float | None = None,
        interceptors: tuple[grpc.UnaryUnaryClientInterceptor, ...] = (),
    ) -> None:
        """`target` is host:port; `token` is sent as a bearer token; with `tls_ca` (a PEM file of the
        certificates to trust) the connection uses TLS; `timeout` is each call's deadline in seconds;
        `interceptors` wrap the channel (e.g. quiver.deploy.routing's, for a Ray Serve deployment)."""
        if tls_ca is not None:
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=tls_ca.read_bytes()))
        else:
            self._channel = grpc.insecure_channel(target)
        self._channel = grpc.intercept_channel(self._channel, *interceptors) if interceptors else self._channel
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout
        self.inference = inference_pb2_grpc.InferenceServiceStub(self._channel)
        self.adapters = adapters_pb2_grpc.AdapterServiceStub(self._channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    @staticmethod
    def request(
        *, text: str | None = None, token_ids: list[int] | None = None, chat: str | None = None, adapter_id: str = "",
        max_new_tokens: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float | None = None,
        seed: int | None = None, stop: tuple[str, ...] = (), stop_token_ids: tuple[int, ...] = (), ignore_eos: bool = False,
        min_new_tokens: int = 0, repetition_penalty: float | None = None, presence_penalty: float | None = None,
        frequency_penalty: float | None = None, n: int = 0, top_logprobs: int | None = None,
        prompt_logprobs: bool = False, cache_scope: str = "",
    ) -> inference_pb2.GenerateRequest:
        """A GenerateRequest from one of: plain `text`, `token_ids`, or a `chat` user message. The other
        arguments are the request fields of the same names (None: unset, the server's default)."""
        if chat is not None:
            prompt = inference_pb2.Prompt(chat=inference_pb2.ChatMessages(
                messages=[inference_pb2.ChatMessage(role=inference_pb2.CHAT_ROLE_USER, content=chat)]))
        elif token_ids is not None:
            prompt = inference_pb2.Prompt(token_ids=inference_pb2.TokenIds(ids=token_ids))
        else:
            prompt = inference_pb2.Prompt(text=text or "")
        sampling = inference_pb2.SamplingParams(
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, repetition_penalty=repetition_penalty,
            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, n=n, top_logprobs=top_logprobs,
            prompt_logprobs=prompt_logprobs,
        )
        stopping = inference_pb2.StoppingCriteria(
            max_new_tokens=max_new_tokens, stop_strings=stop, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos,
            min_new_tokens=min_new_tokens,
        )
        return inference_pb2.GenerateRequest(
            adapter_id=adapter_id, prompt=prompt, sampling=sampling, stopping=stopping, cache_scope=cache_scope
        )

    def generate(self, request: inference_pb2.GenerateRequest | None = None, **fields) -> inference_pb2.GenerateResponse:
        """Run `request`, or `self.request(**fields)` when no request is given."""
        request = request if request is not None else self.request(**fields)
        return self.inference.Generate(request, timeout=self._timeout, metadata=self._metadata)

    def generate_stream(
        self, request: inference_pb2.GenerateRequest | None = None, **fields
    ) -> Iterator[inference_pb2.GenerateStreamResponse]:
        """The stream's messages (of `request`, or of `self.request(**fields)`); cancel it with `.cancel()` on
        the returned iterator. With n > 1, each message's `index` names its sample."""
        request = request if request is not None else self.request(**fields)
        return self.inference.GenerateStream(request, timeout=self._timeout, metadata=self._metadata)

    def server_info(self) -> inference_pb2.GetServerInfoResponse:
        return self.inference.GetServerInfo(inference_pb2.GetServerInfoRequest(), timeout=self._timeout, metadata=self._metadata)

    def list_adapters(self) -> list[adapters_pb2.Adapter]:
        response = self.adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=self._timeout, metadata=self._metadata)
        return list(response.adapters)

    def load_adapter(self, adapter_id: str, path: str, *, replace: bool = False) -> adapters_pb2.Adapter:
        """Load a directory that is on the server (under one of its adapter roots)."""
        request = adapters_pb2.LoadAdapterRequest(adapter_id=adapter_id, path=path, replace=replace)
        return self.adapters.LoadAdapter(request, timeout=self._timeout, metadata=self._metadata).adapter

    def upload_adapter(self, adapter_id: str, directory: Path, *, replace: bool = False) -> adapters_pb2.Adapter:
        """Send the files of a local adapter directory (not its subdirectories) and serve them."""
        files = sorted(p for p in Path(directory).iterdir() if p.is_file())
        return self.adapters.UploadAdapter(
            _upload_messages(adapter_id, files, replace=replace), timeout=self._timeout, metadata=self._metadata
        ).adapter

    def unload_adapter(self, adapter_id: str) -> None:
        self.adapters.UnloadAdapter(adapters_pb2.UnloadAdapterRequest(adapter_id=adapter_id), timeout=self._timeout,
                                    metadata=self._metadata)


def _upload_messages(adapter_id: str, files: list[Path], *, replace: bool) -> Iterator[adapters_pb2.UploadAdapterRequest]:
    yield adapters_pb2.UploadAdapterRequest(header=adapters_pb2.UploadHeader(adapter_id=adapter_id, replace=replace))
    for path in files:
        with path.open("rb") as f:
            chunk = f.read(CHUNK_BYTES)
            while True:  # an empty file is sent as one empty chunk
                yield adapters_pb2.UploadAdapterRequest(chunk=adapters_pb2.FileChunk(file_name=path.name, data=chunk))
                chunk = f.read(CHUNK_BYTES)
                if not chunk:
                    break
