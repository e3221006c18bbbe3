"""What a file is, judged by its first bytes, never by its name.

Every place that must tell a user what they handed it (``load_state``, ``verify_checkpoint``,
``keisei-fn info`` on a path, ``import_legacy``) asks :func:`identify_file`, which reads at
most :data:`HEAD_BYTES` bytes and recognises:

==================  ==========================================================================
kind                first bytes
==================  ==========================================================================
``torch_zip``       ``PK\\x03\\x04`` whose first member is ``<archive>/data.pkl`` (``torch.save``)
``zip``             another zip archive (or one too short to name its first member)
``torch_pickle``    a pickle (``\\x80`` then protocol 2-5): torch.save's pre-1.6 format when
                    torch's magic number follows, else a plain ``pickle.dump`` file
``weights``         a safetensors file (8-byte little-endian header length, then ``{``) whose
                    ``__metadata__`` is keisei_fn's: one of our weights files
``safetensors``     any other safetensors file
``sidecar``         a JSON object with ``"format":"keisei_fn.checkpoint"``: one of our sidecars
``json``            any other JSON object or array
``empty``           no bytes at all
``unknown``         anything else
==================  ==========================================================================

Example:
    >>> identify_bytes(b"PK\\x03\\x04" + bytes(22) + b"\\x10\\x00\\x00\\x00archive/data.pkl").kind
    'torch_zip'
    >>> identify_bytes(b"hello world").description
    "not a recognisable checkpoint (first bytes b'hello world')"
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

import orjson

from keisei_fn.meta import FORMAT_NAME
from keisei_fn.paths import PathArg, run_path
from keisei_fn.store._fs import read_head
from keisei_fn.store.weights import METADATA

__all__ = ["HEAD_BYTES", "FileKind", "identify_bytes", "identify_file"]

#: How many bytes are read to identify a file (enough for a zip's first member name, a
#: safetensors header's ``__metadata__`` and a sidecar's ``format`` and ``name``).
HEAD_BYTES = 4096
#: How many of the first bytes an "unknown" file's description shows.
SHOWN_BYTES = 16

_ZIP_MAGIC = b"PK\x03\x04"
_ZIP_HEADER = struct.Struct("<26xHH")  # file name length, extra field length
#: torch's legacy (pre-1.6) format pickles this magic number first (a LONG1 opcode).
_TORCH_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_PICKLE_PROTOCOLS = frozenset({2, 3, 4, 5})
#: A safetensors header longer than this is taken for something else.
_MAX_SAFETENSORS_HEADER = 1 << 40
_OUR_WEIGHTS = orjson.dumps({"__metadata__": METADATA})[1:-1]
_OUR_SIDECAR = re.compile(rb'"format"\s*:\s*"' + re.escape(FORMAT_NAME.encode()) + rb'"')
_SIDECAR_NAME = re.compile(rb'"name"\s*:\s*"([A-Za-z0-9_.-]{1,255})"')

_TORCH = frozenset({"torch_zip", "torch_pickle"})
_OURS = frozenset({"weights", "sidecar"})


@dataclass(frozen=True, slots=True, kw_only=True)
class FileKind:
    """What a file's first bytes say it is.

    Attributes:
        kind: one of ``torch_zip``, ``zip``, ``torch_pickle``, ``weights``, ``safetensors``,
            ``sidecar``, ``json``, ``empty``, ``unknown`` (see the module docstring).
        description: the same in words, e.g. ``"a torch.save zip archive (archive/data.pkl)"``.
        name: for a sidecar, the checkpoint name it records (``""`` when not seen).
    """

    kind: str
    description: str
    name: str = ""

    @property
    def is_torch(self) -> bool:
        """Whether it is (or claims to be) a ``torch.save`` file or a pickle."""
        return self.kind in _TORCH

    @property
    def is_zip(self) -> bool:
        """Whether it starts like a zip archive."""
        return self.kind in ("torch_zip", "zip")

    @property
    def is_ours(self) -> bool:
        """Whether it is a keisei_fn checkpoint's file: its weights file or its sidecar."""
        return self.kind in _OURS


def identify_bytes(head: bytes) -> FileKind:
    """Identify a file by its first bytes (pure; see the module docstring).

    Args:
        head: the file's first bytes (:data:`HEAD_BYTES` of them suffice).

    Returns:
        What they say the file is.

    Example:
        >>> identify_bytes(b"\\x80\\x02" + _TORCH_LEGACY_MAGIC).description
        "torch.save's pre-1.6 (non-zip) pickle format"
        >>> identify_bytes(b"").kind
        'empty'
    """
    if not head:
        return FileKind(kind="empty", description="empty (0 bytes)")
    if head.startswith(_ZIP_MAGIC):
        return _zip_kind(head)
    if len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS:
        if head[2:].startswith(_TORCH_LEGACY_MAGIC):
            return FileKind(
                kind="torch_pickle", description="torch.save's pre-1.6 (non-zip) pickle format"
            )
        return FileKind(kind="torch_pickle", description=f"a Python pickle (protocol {head[1]})")
    if len(head) > 8 and head[8:9] == b"{":
        (length,) = struct.unpack_from("<Q", head)
        if 2 <= length < _MAX_SAFETENSORS_HEADER:
            if _OUR_WEIGHTS in head[8 : 8 + length]:
                ours = "a keisei_fn weights file (safetensors)"
                return FileKind(kind="weights", description=ours)
            return FileKind(kind="safetensors", description="a safetensors file")
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text[:1] == b"{" and _OUR_SIDECAR.search(text):
        named = _SIDECAR_NAME.search(text)
        return FileKind(
            kind="sidecar",
            description="a keisei_fn checkpoint sidecar (JSON)",
            name=named[1].decode() if named else "",
        )
    if text[:1] in (b"{", b"["):
        return FileKind(kind="json", description="a JSON file, not a keisei_fn sidecar")
    return FileKind(
        kind="unknown",
        description=f"not a recognisable checkpoint (first bytes {head[:SHOWN_BYTES]!r})",
    )


def _zip_kind(head: bytes) -> FileKind:
    """A zip archive's kind: torch.save's when its first member is ``<archive>/data.pkl``."""
    if len(head) < _ZIP_HEADER.size:
        return FileKind(kind="zip", description="a zip archive (truncated: no member header)")
    name_length, _ = _ZIP_HEADER.unpack_from(head)
    name = head[_ZIP_HEADER.size : _ZIP_HEADER.size + name_length]
    if len(name) < name_length:
        return FileKind(kind="zip", description="a zip archive (its first member not seen)")
    shown = name.decode("utf-8", "backslashreplace")
    if name == b"data.pkl" or name.endswith(b"/data.pkl"):
        return FileKind(kind="torch_zip", description=f"a torch.save zip archive ({shown})")
    return FileKind(
        kind="zip", description=f"a zip archive whose first member is {shown!r}, not torch.save's"
    )


def identify_file(path: PathArg) -> FileKind:
    """Identify a file by its first :data:`HEAD_BYTES` bytes (nothing more is read).

    Args:
        path: a local path or an fsspec URL.

    Returns:
        What the file is.

    Raises:
        FileNotFoundError: when it does not exist.
        IntegrityError: when it is not a regular file (a FIFO, socket or device).

    Example:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = pathlib.Path(tmp, "model.bin")
        ...     _ = path.write_bytes(bytes(range(40)))
        ...     identify_file(path).kind
        'unknown'
    """
    return identify_bytes(read_head(run_path(path), limit=HEAD_BYTES))
