"""The gRPC API, generated from protos/ by `make generate` (never edited by hand)."""

from policy_engine.api.kontext.pdp.v1 import pdp_pb2, pdp_pb2_grpc

__all__ = ["pdp_pb2", "pdp_pb2_grpc"]
