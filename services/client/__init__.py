"""A typed Python client of the suite: `OneSeekClient` (blocking) and `AsyncOneSeekClient`
(asyncio), the same calls over the gRPC API, answering the generated protobuf messages and
raising the project's own errors. `services.client.hf` adds a `transformers.TrainerCallback`
that reports a Hugging Face Trainer's epochs as an outside run (it is the only module here
that imports transformers, and only when imported itself).

    from services.client import OneSeekClient

    with OneSeekClient() as client:  # addresses and tokens from ONESEEK_* as the suite reads them
        run_id = client.start_run("sample", ["tiny-llama"], epochs=1).run_id
        for event in client.watch(run_id):
            print(event.seq, event.WhichOneof("payload"))
"""

from services.client.aio import AsyncOneSeekClient
from services.client.errors import NotAuthorized, ServiceError
from services.client.settings import Backoff, ClientSettings
from services.client.sync import OneSeekClient
from services.core.errors import (
    AlreadyExists,
    Conflict,
    InvalidInput,
    NotFound,
    OneSeekError,
    TooSlow,
    Unavailable,
)

__all__ = [
    "AlreadyExists",
    "AsyncOneSeekClient",
    "Backoff",
    "ClientSettings",
    "Conflict",
    "InvalidInput",
    "NotAuthorized",
    "NotFound",
    "OneSeekClient",
    "OneSeekError",
    "ServiceError",
    "TooSlow",
    "Unavailable",
]
