"""TFRecord files of ``tf.train.Example`` records, without TensorFlow or protobuf.

The wire format is small: each record is ``uint64 length | uint32 masked_crc32c(length)
| data | uint32 masked_crc32c(data)``, and an Example is a protobuf map of feature
name -> bytes_list / int64_list. DALI reads these with ``fn.readers.tfrecord`` and an
index file of ``"<offset> <size>"`` lines (DALI itself checks no CRC: ``verify`` does).
"""
from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Mapping, Sequence

import crc32c as _crc32c

_MASK_DELTA = 0xA282EAD8
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class TFRecordError(ValueError):
    """A record whose framing, checksum or Example encoding is wrong."""


def masked_crc32c(data: bytes | memoryview) -> int:
    crc = _crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


# --------------------------------------------------------------------------- protobuf bits
def _varint_of(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 two's complement, as protobuf writes it
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


_SMALL_VARINTS = [_varint_of(v) for v in range(1 << 14)]  # 1-2 byte varints: lengths, labels, sizes


def _varint(value: int) -> bytes:
    return _SMALL_VARINTS[value] if 0 <= value < 16384 else _varint_of(value)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(buf):
            raise TFRecordError("truncated varint in Example")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise TFRecordError("varint longer than 10 bytes in Example")


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


@functools.lru_cache(maxsize=256)
def _feature_key(name: str) -> bytes:
    """A map entry's key field: the same bytes for every record."""
    return _len_field(1, name.encode())


@dataclass(frozen=True)
class EncodedExample:
    data: bytes
    image_offset: int  # where the first bytes feature's payload starts inside ``data``


def encode_example(bytes_features: Mapping[str, bytes], int_features: Mapping[str, Sequence[int]]) -> EncodedExample:
    """Serialize a ``tf.train.Example``; the first bytes feature's payload offset is returned
    so readers can slice the image out of the file without parsing (records index). Each
    payload is copied once: the nested fields' headers are made from lengths alone (a CIFAR
    image's Example is mostly header work, at tens of thousands a second)."""
    parts: list[bytes] = []
    size = 0
    image_offset = -1
    for name, value in bytes_features.items():
        value = bytes(value)
        prefix = _bytes_entry_prefix(name, len(value))
        if image_offset < 0:
            image_offset = size + len(prefix)
        parts += (prefix, value)
        size += len(prefix) + len(value)
    for name, values in int_features.items():
        entry = _int_entry(name, int(values[0])) if len(values) == 1 else _int_entry_of(name, values)
        parts.append(entry)
        size += len(entry)
    header = _varint(1 << 3 | 2) + _varint(size)  # Example.features
    return EncodedExample(b"".join([header, *parts]), len(header) + image_offset if image_offset >= 0 else -1)


_TAG1, _TAG2, _TAG3 = _varint(1 << 3 | 2), _varint(2 << 3 | 2), _varint(3 << 3 | 2)


def _bytes_entry_prefix(name: str, n: int) -> bytes:
    """Features.feature map entry {key: name, value: Feature{bytes_list: BytesList{value: [<n bytes>]}}},
    all but the payload."""
    bytes_list = len(_TAG1) + len(_varint(n)) + n                  # BytesList.value
    feature = len(_TAG1) + len(_varint(bytes_list)) + bytes_list   # Feature.bytes_list
    key = _feature_key(name)
    body = len(key) + len(_TAG2) + len(_varint(feature)) + feature  # map entry: key, value
    return b"".join((_TAG1, _varint(body), key, _TAG2, _varint(feature), _TAG1, _varint(bytes_list), _TAG1,
                     _varint(n)))


def _int_entry_of(name: str, values: Sequence[int]) -> bytes:
    packed = b"".join(_varint(int(v)) for v in values)
    int_list = _len_field(1, packed)             # Int64List.value (packed)
    feature = _len_field(3, int_list)            # Feature.int64_list
    return _len_field(1, _feature_key(name) + _len_field(2, feature))


@functools.lru_cache(maxsize=1 << 16)
def _int_entry(name: str, value: int) -> bytes:
    """A one-value int64 feature's map entry (heights, widths and labels repeat: made once)."""
    return _int_entry_of(name, (value,))


def decode_example(data: bytes | memoryview) -> tuple[dict[str, bytes], dict[str, list[int]]]:
    """Parse an Example into (bytes features, int64 features). Raises TFRecordError."""
    buf = memoryview(data)

    def fields(view: memoryview) -> Iterator[tuple[int, int, memoryview | int]]:
        pos = 0
        while pos < len(view):
            key, pos = _read_varint(view, pos)
            number, wire = key >> 3, key & 7
            if wire == 2:
                n, pos = _read_varint(view, pos)
                if pos + n > len(view):
                    raise TFRecordError("length-delimited field runs past the end of the Example")
                yield number, wire, view[pos:pos + n]
                pos += n
            elif wire == 0:
                v, pos = _read_varint(view, pos)
                yield number, wire, v
            else:
                raise TFRecordError(f"unexpected protobuf wire type {wire} in Example")

    byte_feats: dict[str, bytes] = {}
    int_feats: dict[str, list[int]] = {}
    for number, wire, features in fields(buf):
        if number != 1 or wire != 2:
            continue
        for number2, _, entry in fields(features):
            if number2 != 1:
                continue
            name, feature = None, None
            for n3, _, v in fields(entry):
                if n3 == 1:
                    name = bytes(v).decode()
                elif n3 == 2:
                    feature = v
            if name is None or feature is None:
                raise TFRecordError("feature map entry without key or value")
            for kind, _, lst in fields(feature):
                if kind == 1:
                    byte_feats[name] = b"".join(bytes(v) for n, _, v in fields(lst) if n == 1)
                elif kind == 3:
                    vals: list[int] = []
                    for n, w, v in fields(lst):
                        if w == 2:  # packed
                            p = 0
                            while p < len(v):
                                x, p = _read_varint(v, p)
                                vals.append(x - (1 << 64) if x >= 1 << 63 else x)
                        else:
                            vals.append(v - (1 << 64) if v >= 1 << 63 else v)
                    int_feats[name] = vals
    return byte_feats, int_feats


# --------------------------------------------------------------------------- framing
RECORD_HEADER = 12    # 8 length + 4 crc(length), before the data
RECORD_OVERHEAD = 16  # header + 4 crc(data)


def write_record(f: BinaryIO, data: bytes) -> int:
    """Append one framed record; returns its total size on disk."""
    length = _U64.pack(len(data))
    f.write(length)
    f.write(_U32.pack(masked_crc32c(length)))
    f.write(data)
    f.write(_U32.pack(masked_crc32c(data)))
    return len(data) + RECORD_OVERHEAD


def read_records(buf: bytes | memoryview, check_crc: bool = True) -> Iterator[tuple[int, memoryview]]:
    """Yield (offset, data) for each record of a whole TFRecord file held in ``buf``."""
    view = memoryview(buf)
    pos = 0
    index = 0
    while pos < len(view):
        if pos + RECORD_HEADER > len(view):
            raise TFRecordError(f"record {index} at byte {pos}: truncated header")
        length_bytes = view[pos:pos + 8]
        (length,) = _U64.unpack(length_bytes)
        (len_crc,) = _U32.unpack(view[pos + 8:pos + RECORD_HEADER])
        if check_crc and masked_crc32c(length_bytes) != len_crc:
            raise TFRecordError(f"record {index} at byte {pos}: length checksum mismatch")
        end = pos + RECORD_HEADER + length + 4
        if end > len(view):
            raise TFRecordError(f"record {index} at byte {pos}: truncated data ({length} bytes announced)")
        data = view[pos + RECORD_HEADER:pos + RECORD_HEADER + length]
        (data_crc,) = _U32.unpack(view[end - 4:end])
        if check_crc and masked_crc32c(data) != data_crc:
            raise TFRecordError(f"record {index} at byte {pos}: data checksum mismatch")
        yield pos, data
        pos = end
        index += 1


def format_index(entries: Sequence[tuple[int, int]]) -> str:
    """DALI's index file: one ``"<offset> <size>"`` line per record."""
    return "".join(f"{off} {size}\n" for off, size in entries)


def parse_index(text: str) -> list[tuple[int, int]]:
    out = []
    for n, line in enumerate(text.splitlines()):
        parts = line.split()
        if len(parts) != 2:
            raise TFRecordError(f"index line {n + 1}: expected '<offset> <size>', got {line!r}")
        out.append((int(parts[0]), int(parts[1])))
    return out
