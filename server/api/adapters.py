"""AdapterService for `quiver serve`: each call is the adapter catalogue's (`quiver.api.catalogue`), over this
server's engine and its own store."""

from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from quiver.adapters.store import AdapterStore
from quiver.api.catalogue import AdapterCatalogue, ServiceEngine
from quiver.api.state import ServingState
from quiver.metrics import Metrics
from quiver.v1 import adapters_pb2 as pb
from quiver.v1 import adapters_pb2_grpc


class AdapterServicer(adapters_pb2_grpc.AdapterServiceServicer):
    def __init__(
        self, *, state: ServingState, store: AdapterStore, roots: tuple[Path, ...], metrics: Metrics,
        upload_idle_seconds: float,
    ) -> None:
        self._catalogue = AdapterCatalogue(state=state, store=store, engine=ServiceEngine(state), roots=roots,
                                           metrics=metrics, upload_idle_seconds=upload_idle_seconds)

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext) -> pb.LoadAdapterResponse:
        return await self._catalogue.load(request.adapter_id, request.path, replace=request.replace)

    async def UploadAdapter(
        self, request_iterator: AsyncIterator[pb.UploadAdapterRequest], context: grpc.aio.ServicerContext
    ) -> pb.UploadAdapterResponse:
        return await self._catalogue.upload(request_iterator)

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext) -> pb.UnloadAdapterResponse:
        return await self._catalogue.unload(request.adapter_id)

    async def ListAdapters(self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext) -> pb.ListAdaptersResponse:
        return await self._catalogue.list()
