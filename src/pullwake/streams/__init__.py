"""Redis Streams: key builder and the wake stream adapter."""

from pullwake.streams.keys import GROUP, Keys
from pullwake.streams.wakes import StreamInfo, WakeStreams

__all__ = ["GROUP", "Keys", "StreamInfo", "WakeStreams"]
