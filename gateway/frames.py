"""Websocket text frames built once and written to every client as they are.

A server's frames are not masked (RFC 6455 section 5.1) and the gateway never compresses, so an
event's frame is the same bytes for every client: the feed frames each event once, and sending
it to a client that keeps up is a single write to that client's socket.
"""

from __future__ import annotations

import struct

_FIN_TEXT = 0x81


def text_frame(payload: bytes) -> bytes:
    """`payload` (UTF-8 JSON) as one complete, unmasked, uncompressed text frame."""
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", _FIN_TEXT, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", _FIN_TEXT, 126, size)
    else:
        header = struct.pack("!BBQ", _FIN_TEXT, 127, size)
    return header + payload


def payload_of(frame: bytes) -> bytes:
    """The payload of a frame made by `text_frame`."""
    length = frame[1] & 0x7F
    start = 2 if length < 126 else 4 if length == 126 else 10
    return frame[start:]
