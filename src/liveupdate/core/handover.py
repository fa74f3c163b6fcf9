"""The handover image, as the core and the server have always imported it.

The image is ABI, not core implementation: its schema, records and errors
live in :mod:`liveupdate.handover_abi` and its libfdt-based codec in
:mod:`liveupdate.handover_codec`, both at the ABI layer so that ``luoctl``
reads images without importing the core. This module keeps every name it
exported before that split, so existing imports keep working; new code
imports the two ABI modules directly.
"""

from __future__ import annotations

from liveupdate.handover_abi import (
    IMAGE_COMPATIBLE,
    IMAGE_VERSION,
    MAX_SESSION_NAME_LENGTH,
    SUPPORTED_VERSIONS,
    CorruptImageError,
    FileRecord,
    HandoverError,
    HandoverImage,
    SessionRecord,
    UnknownVersionError,
)
from liveupdate.handover_codec import decode_image, encode_image, image_to_dict

__all__ = [
    "IMAGE_COMPATIBLE",
    "IMAGE_VERSION",
    "MAX_SESSION_NAME_LENGTH",
    "SUPPORTED_VERSIONS",
    "CorruptImageError",
    "FileRecord",
    "HandoverError",
    "HandoverImage",
    "SessionRecord",
    "UnknownVersionError",
    "decode_image",
    "encode_image",
    "image_to_dict",
]
