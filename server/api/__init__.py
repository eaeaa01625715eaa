"""The gRPC front end: servicers (proto <-> engine objects), the error mapping, auth, health, reflection."""
