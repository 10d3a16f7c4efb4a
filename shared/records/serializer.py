"""The fleet's only wire format: msgpack through msgspec, registered with kombu.

Celery's pickle is never accepted, so a message from the queue cannot execute code.
Task arguments are msgspec Structs on the way out and plain maps on the way in; each
task converts its map back into the Struct it expects (``msgspec.convert``), which
validates the message.
"""

from __future__ import annotations

from typing import Any

import msgspec
from kombu.serialization import register

NAME = "msgspec"
CONTENT_TYPE = "application/x-embed-fleet-msgpack"

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


def dumps(obj: Any) -> bytes:
    return _encoder.encode(obj)


def loads(data: bytes | str) -> Any:
    if isinstance(data, str):  # kombu hands str when a transport decoded the body
        data = data.encode("latin-1")
    return _decoder.decode(data)


def register_serializer() -> None:
    """Register the serializer; producer, workers and Flower all call this."""
    register(  # type: ignore[no-untyped-call]
        NAME, dumps, loads, content_type=CONTENT_TYPE, content_encoding="binary"
    )
