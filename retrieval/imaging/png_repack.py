"""PNG files re-packed so that libdeflate inflates them and Pillow only unfilters them.

A 2048² 16-bit PNG spends most of its decode in zlib's inflate, which Pillow's bundled zlib 1.2.13
does at about half the speed of libdeflate (docs/benchmarks.md). No library at hand decodes 16-bit
grayscale PNG over libdeflate, and PNG's row filters (Average and Paeth are sequential within a row)
are slow outside compiled code. So :func:`repack_png` inflates the image data with libdeflate
(``imagecodecs.deflate_decode``), wraps the inflated, still filtered rows in a zlib stream of stored
(uncompressed) blocks, and returns the same PNG with that stream as its only ``IDAT``. Pillow then
decodes it as any PNG, with its inflate reduced to a copy, and its own C code unfilters the rows:
the pixels are exactly Pillow's for the original file.

Contract: :func:`repack_png` never raises on bad input. It returns ``None`` whenever the re-pack
does not apply or the file is not sound (not a PNG, interlaced, animated, a chunk running past the
end, image data split around other chunks, more pixels than ``max_pixels``, a deflate stream that is
corrupt or inflates to another size); the caller then decodes the original bytes with Pillow, whose
error names the problem. Every chunk other than ``IDAT`` is kept byte for byte, CRC included, so
Pillow checks them as before; the inflate checks the stream's Adler-32.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import imagecodecs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # IHDR colour type -> samples per pixel
_MAX_CHUNK = 2**31 - 1  # PNG's limit on one chunk's length


class _Chunk(NamedTuple):
    kind: bytes
    body: memoryview
    crc: memoryview


def repack_png(data: bytes, *, max_pixels: int) -> bytes | None:
    """``data`` (a whole PNG file) with its image data inflated by libdeflate and stored uncompressed; None when
    the re-pack does not apply (see the module's contract)."""
    chunks = _chunks(data)
    if not chunks or chunks[0].kind != b"IHDR" or len(chunks[0].body) != 13:
        return None
    width, height, bit_depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0].body)
    if (interlace != 0 or colour_type not in _CHANNELS or width * height > max_pixels
            or any(chunk.kind == b"acTL" for chunk in chunks)):
        return None
    idat = [index for index, chunk in enumerate(chunks) if chunk.kind == b"IDAT"]
    if not idat or idat[-1] - idat[0] + 1 != len(idat):
        return None
    row_bytes = (width * bit_depth * _CHANNELS[colour_type] + 7) // 8
    inflated_size = height * (1 + row_bytes)
    try:
        filtered_rows = imagecodecs.deflate_decode(b"".join(chunks[i].body for i in idat), out=inflated_size)
    except imagecodecs.DeflateError:
        return None
    if len(filtered_rows) != inflated_size:
        return None
    stored = imagecodecs.deflate_encode(filtered_rows, level=0)  # zlib stream of stored blocks: inflating is a copy
    if len(stored) > _MAX_CHUNK:
        return None
    idat_crc = imagecodecs.deflate_crc32(stored, imagecodecs.deflate_crc32(b"IDAT"))
    return b"".join([PNG_SIGNATURE, *map(_as_stored, chunks[:idat[0]]),
                     struct.pack(">I", len(stored)), b"IDAT", stored, struct.pack(">I", idat_crc),
                     *map(_as_stored, chunks[idat[-1] + 1:])])


def _chunks(data: bytes) -> list[_Chunk] | None:
    """The file's chunks up to and including IEND; None when it is not a PNG, a chunk is cut or IEND is missing."""
    if not data.startswith(PNG_SIGNATURE):
        return None
    view = memoryview(data)
    chunks: list[_Chunk] = []
    position = len(PNG_SIGNATURE)
    while position + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, position)
        end = position + 12 + length
        if length > _MAX_CHUNK or end > len(data):
            return None
        chunks.append(_Chunk(bytes(view[position + 4:position + 8]), view[position + 8:end - 4], view[end - 4:end]))
        position = end
        if chunks[-1].kind == b"IEND":
            return chunks
    return None


def _as_stored(chunk: _Chunk) -> bytes:
    """A chunk's bytes as they were in the file: length, type, body, CRC."""
    return struct.pack(">I", len(chunk.body)) + chunk.kind + chunk.body + chunk.crc
