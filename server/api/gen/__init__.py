"""Generated protobuf and gRPC modules of quiver.v1 (`make protos` writes them from protos/; not committed)."""
