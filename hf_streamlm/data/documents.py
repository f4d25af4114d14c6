"""A document as the training stream carries it: its text, where it came from, and its content key.

The key (8 bytes of blake2b) is what the data state and the document trace hold instead of the text
(issue 13): a resume checks it to know the re-read documents are the ones it left.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple


def document_key(text: str) -> int:
    """The document's 8-byte content key (``hashlib.blake2b(text, digest_size=8)`` as an integer; its
    ``f"{key:016x}"`` is the hexdigest the document trace writes)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


class Doc(NamedTuple):
    """A document read from the source: its text and where it came from."""

    text: str
    source: int  # index in data.sources
    serial: int  # the n-th document this worker read (across passes)
    epoch: int  # the pass it was read in (0 first)
    key: int  # document_key(text)
