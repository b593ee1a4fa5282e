"""The wire contract: code generated from protos/ plus the JSON codec every process shares.

Import messages from here (`from services.api import training_pb2`), never from the generated
tree directly, so the generated package can move without touching callers.
"""

from services.api.oneseek.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from services.api.oneseek.training.v1 import training_pb2, training_pb2_grpc

__all__ = ["metrics_pb2", "metrics_pb2_grpc", "training_pb2", "training_pb2_grpc"]
