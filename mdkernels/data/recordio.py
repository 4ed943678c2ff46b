"""MXNet RecordIO (insightface's ``train.rec`` + ``train.idx``) read and written in pure Python.

Record framing: ``uint32 magic 0xced7230a``, ``uint32 lrecord`` (upper 3 bits: continuation flag,
lower 29: length), payload, zero padding to 4 bytes. As in dmlc, a payload holding the magic word at a
4-byte-aligned offset is written as parts (flags 1, 2, ..., 3) split there, the word itself dropped.
An image payload is an ``IRHeader`` (``uint32 flag, float32 label, uint64 id, uint64 id2``), then
``flag`` float32 labels when ``flag > 0``, then the encoded image. The ``.idx`` file holds one
``key\toffset`` line per record.

insightface's layout: record 0 is a header whose labels are ``(first identity record, end)``; image
records are keys ``1 .. N``; identity records ``first .. end-1`` hold each identity's ``[start, end)``
image keys. Readers accept files without the header (then every record is an image).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_HEADER = struct.Struct("<IfQQ")


def pack(label: float | Iterable[float], payload: bytes, id_: int = 0) -> bytes:
    """IRHeader + payload; a sequence ``label`` is stored in the extra-labels field (``flag = len``)."""
    if isinstance(label, (int, float)):
        return _HEADER.pack(0, float(label), id_, 0) + payload
    labels = [float(v) for v in label]
    return _HEADER.pack(len(labels), 0.0, id_, 0) + struct.pack(f"<{len(labels)}f", *labels) + payload


def unpack(record: bytes) -> tuple[tuple[float, ...] | float, bytes]:
    """``(label, payload)``; the label is a float, or a tuple when the header carries several."""
    if len(record) < _HEADER.size:
        raise ValueError(f"record of {len(record)} bytes is shorter than an IRHeader ({_HEADER.size})")
    flag, label, _, _ = _HEADER.unpack_from(record)
    if flag > 0:
        end = _HEADER.size + 4 * flag
        if len(record) < end:
            raise ValueError(f"record header announces {flag} labels but the record is too short")
        return struct.unpack_from(f"<{flag}f", record, _HEADER.size), record[end:]
    return label, record[_HEADER.size :]


class RecordWriter:
    """Writes ``path.rec`` and ``path.idx`` (keys in the order given)."""

    def __init__(self, rec_path: str | Path, idx_path: str | Path) -> None:
        self.rec = open(rec_path, "wb")  # noqa: SIM115
        self.idx = open(idx_path, "w")  # noqa: SIM115

    def write(self, key: int, record: bytes) -> None:
        """As dmlc's ``RecordIOWriter::WriteRecord``: a payload holding the magic word at a 4-byte-aligned
        offset is split there into parts (flags 1, 2, ..., 3) and the magic word itself is dropped."""
        offset = self.rec.tell()
        if len(record) >= 1 << 29:
            raise ValueError("a record must be smaller than 512 MB (29-bit length field)")
        start = 0
        for i in range(0, len(record) - len(record) % 4, 4):
            if record[i : i + 4] == _MAGIC_BYTES:
                self._part(1 if start == 0 else 2, record[start:i])
                start = i + 4
        self._part(3 if start else 0, record[start:])
        self.rec.write(b"\0" * ((4 - len(record) % 4) % 4))
        self.idx.write(f"{key}\t{offset}\n")

    def _part(self, cflag: int, data: bytes) -> None:
        self.rec.write(struct.pack("<II", MAGIC, (cflag << 29) | len(data)))
        self.rec.write(data)

    def close(self) -> None:
        self.rec.close()
        self.idx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RecordReader:
    """Random access to a ``.rec`` through its ``.idx``. Safe to use from DataLoader workers: the file
    is (re)opened lazily in each process."""

    def __init__(self, rec_path: str | Path, idx_path: str | Path) -> None:
        self.rec_path, self.idx_path = Path(rec_path), Path(idx_path)
        for p in (self.rec_path, self.idx_path):
            if not p.is_file():
                raise FileNotFoundError(f"RecordIO file not found: {p}")
        self.offsets: dict[int, int] = {}
        size = self.rec_path.stat().st_size
        try:
            lines = self.idx_path.read_text().splitlines()
        except UnicodeDecodeError:
            raise ValueError(f"{self.idx_path}: not a RecordIO index (text lines 'key<TAB>offset')") from None
        for n, line in enumerate(lines, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                key, offset = int(parts[0]), int(parts[1])
            except (ValueError, IndexError):
                raise ValueError(f"{self.idx_path}:{n}: expected 'key<TAB>offset', got {line.strip()!r}") from None
            if not 0 <= offset < size:
                raise ValueError(f"{self.idx_path}:{n}: offset {offset} is outside {self.rec_path} ({size} bytes)")
            self.offsets[key] = offset
        self._file = None
        self._pid = None

    @property
    def keys(self) -> list[int]:
        return list(self.offsets)

    def read(self, key: int) -> bytes:
        """The payload of record ``key`` (split records, as dmlc writes them, are joined back)."""
        import os

        if self._file is None or self._pid != os.getpid():
            self._file = open(self.rec_path, "rb")  # noqa: SIM115
            self._pid = os.getpid()
        if key not in self.offsets:
            raise KeyError(f"record {key} is not in {self.idx_path}")
        self._file.seek(self.offsets[key])
        parts = []
        while True:
            head = self._file.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.rec_path}: truncated record {key} at offset {self.offsets[key]}")
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                raise ValueError(f"{self.rec_path}: bad magic {magic:#x} for record {key} at offset "
                                 f"{self.offsets[key]} (corrupt file, or an .idx from another .rec)")  # fmt: skip
            cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
            data = self._file.read(length)
            if len(data) < length:
                raise ValueError(f"{self.rec_path}: truncated record {key} ({len(data)} of {length} bytes)")
            if (cflag in (2, 3)) != bool(parts):
                raise ValueError(f"{self.rec_path}: record {key} has a broken continuation (flag {cflag})")
            parts.append(data)
            if cflag in (0, 3):  # whole record, or its last part: the split points held the magic word
                return _MAGIC_BYTES.join(parts)

    def read_label(self, key: int) -> tuple[float, ...] | float:
        """The IRHeader label of record ``key``, reading only its first bytes (not the image)."""
        import os

        if self._file is None or self._pid != os.getpid():
            self.read(key)  # opens the file in this process (and checks the framing once)
        self._file.seek(self.offsets[key])
        head = self._file.read(8 + _HEADER.size)
        if len(head) >= 8 + _HEADER.size:
            magic, lrec = struct.unpack_from("<II", head)
            cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
            if magic == MAGIC and cflag in (0, 1) and length >= _HEADER.size:
                flag = struct.unpack_from("<I", head, 8)[0]
                need = _HEADER.size + 4 * flag
                if flag == 0:
                    return unpack(head[8:])[0]
                if length >= need:
                    return unpack(head[8:] + self._file.read(4 * flag))[0]
        return unpack(self.read(key))[0]  # unusual framing: read the whole record

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"], state["_pid"] = None, None
        return state
