"""Client side of adapter-affinity routing: send each request's adapter id as gRPC metadata.

Ray Serve's gRPC proxy routes a call by its `multiplexed_model_id` metadata to a replica that already holds
that model (here: that adapter), and reads only metadata, never the message. `AdapterRoutingInterceptor`
copies the `adapter_id` field of every request that has one (GenerateRequest, LoadAdapterRequest,
UnloadAdapterRequest) into that metadata; a plain `quiver serve` ignores it, so one client fits both.

    channel = grpc.intercept_channel(grpc.insecure_channel(target), AdapterRoutingInterceptor())
"""

import grpc

MULTIPLEXED_MODEL_ID = "multiplexed_model_id"  # the metadata key Ray Serve's gRPC proxy routes by


class AdapterRoutingInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(_with_adapter(client_call_details, request), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(_with_adapter(client_call_details, request), request)


def _with_adapter(details: grpc.ClientCallDetails, request) -> grpc.ClientCallDetails:
    adapter_id = getattr(request, "adapter_id", "")
    if not adapter_id:
        return details
    metadata = [(k, v) for k, v in (details.metadata or ()) if k != MULTIPLEXED_MODEL_ID]
    metadata.append((MULTIPLEXED_MODEL_ID, adapter_id))
    return CallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready,
                        details.compression)


class CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression
