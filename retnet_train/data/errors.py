"""The one exception type for bad data, shared by data_prep and the stream."""
from __future__ import annotations


class DataError(ValueError):
    """Bad or inconsistent data (an input record, a shard, a manifest); the message names the
    file and what is wrong.  A ValueError, so callers that catch ValueError still catch it."""
