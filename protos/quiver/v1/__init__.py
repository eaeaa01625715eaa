"""The `quiver.v1` gRPC modules, generated from the .proto files beside them by `protos/generate.py` (`make
protos`) and installed as `quiver.v1`; not committed, so they always match the installed protobuf runtime."""
