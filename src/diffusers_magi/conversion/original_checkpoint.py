"""Reading the original MAGI-1 files: the three-section config JSON and safetensors weight folders (one file or
shards listed in an index, each optionally zstd-compressed as `<file>.zst`, as the original loader accepts).

Weights are read header first: `open_safetensors_folder` / `open_safetensors_file` parse only the safetensors headers
(names, shapes, dtypes, byte ranges; for a `.zst` file only the decompressed first bytes), so a whole release can be
checked in seconds, and `SafetensorsWeights.read` then yields the tensors one at a time, each read straight from the
file into memory of its own (no memory map, no second copy), so that a loader holds at most one tensor besides the
model it fills.
"""

import json
import os
import struct
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from diffusers.utils import logging

logger = logging.get_logger(__name__)

ORIGINAL_CONFIG_SECTIONS = ("model_config", "runtime_config", "engine_config")
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


def read_original_config(config: Union[str, os.PathLike, dict]) -> Dict[str, dict]:
    """An original MAGI-1 config (`model_config`, `runtime_config`, `engine_config`), from a JSON file or a dict
    (e.g. a preset of `diffusers_magi.conversion.presets`)."""
    if isinstance(config, dict):
        source, content = "the given config dict", config
    else:
        source = str(config)
        with open(config, encoding="utf-8") as file:
            content = json.load(file)
    missing = [section for section in ORIGINAL_CONFIG_SECTIONS if section not in content]
    if missing:
        raise ValueError(
            f"{source} is not an original MAGI-1 config: it lacks the section(s) {missing} (expected "
            f"{list(ORIGINAL_CONFIG_SECTIONS)})."
        )
    return content


def original_weight_folder(engine_config: dict) -> str:
    """Name of the DiT weight folder the original loader reads: `inference_weight[.fp8][.distill]`."""
    name = "inference_weight"
    if engine_config.get("fp8_quant", False):
        name += ".fp8"
    if engine_config.get("distill", False):
        name += ".distill"
    return name


# safetensors dtype names -> torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# A header above this is not a safetensors header (the format caps it at 100 MB).
_MAX_HEADER_BYTES = 100_000_000
# Bytes read per system call; also the size of the skip buffer for compressed files.
_READ_BLOCK = 64 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, as its header describes it.

    Attributes:
        name (`str`): the tensor's name in the file.
        shape (`Tuple[int, ...]`): its shape.
        dtype (`torch.dtype`): its stored dtype.
        path (`str`): the file holding it as stored (`<file>.zst` when compressed).
        start, end (`int`): byte range of its data in the (decompressed) file.
    """

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    path: str
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def meta(self) -> torch.Tensor:
        """A meta tensor of this entry's shape and dtype (what converters are planned with)."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


class SafetensorsWeights:
    """The tensors of one weight file or folder, known from the headers; `read` yields their data one at a time.

    Attributes:
        source (`str`): the folder or file these weights come from (for messages).
        entries (`Dict[str, TensorEntry]`): every tensor to be read, by name.
        unlisted (`Dict[str, List[str]]`): per shard, tensors it holds that the index does not list (never read).
    """

    def __init__(self, source: str, entries: Dict[str, TensorEntry], unlisted: Optional[Dict[str, List[str]]] = None):
        self.source = source
        self.entries = entries
        self.unlisted = unlisted or {}

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data that `read()` reads."""
        return sum(entry.nbytes for entry in self.entries.values())

    def read(self, names: Optional[Iterable[str]] = None) -> Iterator[Tuple[str, torch.Tensor]]:
        """Yield `(name, tensor)` for `names` (default: every entry), file by file in storage order; each tensor is a
        freshly allocated CPU tensor (aligned, owning its memory) and the only one this reader holds."""
        wanted = self.entries if names is None else {name: self.entries[name] for name in names}
        by_file: Dict[str, List[TensorEntry]] = {}
        for entry in wanted.values():
            by_file.setdefault(entry.path, []).append(entry)
        for path in sorted(by_file):
            yield from _read_entries(path, sorted(by_file[path], key=lambda entry: entry.start))


def _read_exactly(stream, buffer: memoryview, path: str) -> None:
    filled = 0
    while filled < len(buffer):
        count = stream.readinto(buffer[filled : filled + _READ_BLOCK])
        if not count:
            raise ValueError(f"{path} ends before its header says (truncated or corrupt download?).")
        filled += count


def _read_entries(path: str, entries: List[TensorEntry]) -> Iterator[Tuple[str, torch.Tensor]]:
    compressed = path.endswith(".zst")
    with _open_stream(path) as stream:
        header_bytes = _read_header_length(stream, path)
        data_start = 8 + header_bytes
        position = 0
        if compressed:
            _skip(stream, header_bytes, path)
            position = data_start
        for entry in entries:
            offset = data_start + entry.start
            if compressed:
                if offset < position:
                    raise ValueError(f"{path}: tensors overlap in the file; it is not a valid safetensors file.")
                _skip(stream, offset - position, path)
            else:
                stream.seek(offset)
            data = torch.empty(entry.nbytes, dtype=torch.uint8)
            if entry.nbytes:
                _read_exactly(stream, memoryview(data.numpy()), path)
            position = offset + entry.nbytes
            yield entry.name, data.view(entry.dtype).reshape(entry.shape)


def _skip(stream, count: int, path: str) -> None:
    while count > 0:
        block = stream.read(min(count, _READ_BLOCK))
        if not block:
            raise ValueError(f"{path} ends before its header says (truncated or corrupt download?).")
        count -= len(block)


class _ZstdStream:
    """A zstd-compressed file as a forward-only binary stream (`read`, `readinto`)."""

    def __init__(self, path: str):
        zstandard = _import_zstandard(path)
        self._file = open(path, "rb")
        self._reader = zstandard.ZstdDecompressor().stream_reader(self._file)
        self._error = zstandard.ZstdError
        self._path = path

    def read(self, size: int) -> bytes:
        try:
            return self._reader.read(size)
        except self._error as error:
            raise ValueError(
                f"{self._path} is not a valid zstd file (truncated or corrupt download?): {error}"
            ) from error

    def readinto(self, buffer) -> int:
        try:
            return self._reader.readinto(buffer)
        except self._error as error:
            raise ValueError(
                f"{self._path} is not a valid zstd file (truncated or corrupt download?): {error}"
            ) from error

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._reader.close()
        self._file.close()


def _open_stream(path: str):
    return _ZstdStream(path) if path.endswith(".zst") else open(path, "rb", buffering=0)


def _import_zstandard(path: str):
    try:
        import zstandard
    except ImportError as error:
        raise ImportError(
            f"{path} is zstd-compressed; reading it needs the `zstandard` package: `pip install zstandard` (or "
            "`pip install -e \".[zstd]\"` in a clone of diffusers-magi), or decompress it first with `zstd -d`."
        ) from error
    return zstandard


def _read_header_length(stream, path: str) -> int:
    raw = stream.read(8)
    if len(raw) < 8:
        raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupt download?): it is too short.")
    (length,) = struct.unpack("<Q", raw)
    if length > _MAX_HEADER_BYTES:
        raise ValueError(
            f"{path} is not a valid safetensors file (truncated or corrupt download?): bad header length."
        )
    return length


def read_safetensors_header(path: Union[str, os.PathLike]) -> Dict[str, TensorEntry]:
    """The entries of one safetensors file (plain, or `.zst`-compressed) from its header alone, in storage order.

    Raises:
        ValueError: the file is not a valid safetensors file (bad header, or shorter than its header says: truncated),
            or holds a dtype PyTorch cannot read.
    """
    path = str(path)
    with _open_stream(path) as stream:
        length = _read_header_length(stream, path)
        raw = stream.read(length)
    invalid = f"{path} is not a valid safetensors file (truncated or corrupt download?)"
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{invalid}: its header is not JSON ({error}).") from error
    if len(raw) < length or not isinstance(header, dict):
        raise ValueError(f"{invalid}: its header is incomplete.")
    entries, data_end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = (
                SAFETENSORS_DTYPES.get(info["dtype"]),
                tuple(info["shape"]),
                info["data_offsets"],
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{invalid}: bad header entry for {name}.") from error
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has the dtype {info['dtype']}, which PyTorch cannot read.")
        numel = 1
        for size in shape:
            numel *= size
        if end - start != numel * dtype.itemsize or start < 0:
            raise ValueError(f"{invalid}: the byte range of {name} does not match its shape and dtype.")
        entries[name] = TensorEntry(name, shape, dtype, path, start, end)
        data_end = max(data_end, end)
    if not path.endswith(".zst") and os.path.getsize(path) < 8 + length + data_end:
        raise ValueError(
            f"{invalid}: it is {os.path.getsize(path)} bytes long, its header needs {8 + length + data_end}."
        )
    return dict(sorted(entries.items(), key=lambda item: item[1].start))


def _stored_path(path: str, listed_in: Optional[str] = None) -> str:
    """`path`, or `path + ".zst"` when only the compressed file exists."""
    if os.path.isfile(path):
        return path
    if os.path.isfile(path + ".zst"):
        return path + ".zst"
    where = f" (listed in {listed_in})" if listed_in else ""
    raise FileNotFoundError(f"Weight file {path}{where} is missing, and so is {path}.zst.")


def open_safetensors_file(path: Union[str, os.PathLike]) -> SafetensorsWeights:
    """The tensors of the safetensors file `path` (or `path + ".zst"` when only the compressed file exists), from its
    header.

    Raises:
        FileNotFoundError: neither file exists.
        ValueError: the header is not valid (see `read_safetensors_header`).
    """
    stored = _stored_path(str(path))
    return SafetensorsWeights(stored, read_safetensors_header(stored))


def open_safetensors_folder(folder: Union[str, os.PathLike]) -> SafetensorsWeights:
    """The tensors of an original weight folder, from the headers.

    The folder holds `model.safetensors`, or shards listed in `model.safetensors.index.json`; any of these files may
    instead be stored zstd-compressed as `<name>.zst` (needs the `zstandard` package). As the original loader does,
    only the tensors the index lists are read: a shard holding others is read for the listed ones, with a warning.

    Raises:
        FileNotFoundError: the folder, or a shard the index lists, is missing.
        ValueError: a file is not a valid safetensors file (e.g. truncated), or lacks a tensor the index assigns to it.
    """
    folder = str(folder)
    index_path = os.path.join(folder, SAFETENSORS_INDEX)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as file:
            weight_map = json.load(file).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no `weight_map` (tensor name -> shard file).")
        entries, unlisted = {}, {}
        for shard in sorted(set(weight_map.values())):
            stored = _stored_path(os.path.join(folder, shard), listed_in=index_path)
            shard_entries = read_safetensors_header(stored)
            expected = {name for name, file_name in weight_map.items() if file_name == shard}
            absent = sorted(expected - set(shard_entries))
            if absent:
                raise ValueError(
                    f"Shard {stored} lacks tensor(s) {index_path} assigns to it: {absent[:5]} ({len(absent)} in all)."
                )
            extra = sorted(set(shard_entries) - expected)
            if extra:
                unlisted[stored] = extra
            entries.update({name: entry for name, entry in shard_entries.items() if name in expected})
        for stored, names in unlisted.items():
            logger.warning(
                f"{stored} holds {len(names)} tensor(s) that {index_path} does not list; they are not read, as the "
                f"original loader does not read them: {names[:10]}"
            )
        return SafetensorsWeights(folder, entries, unlisted)
    single_path = os.path.join(folder, SAFETENSORS_SINGLE)
    if os.path.isfile(single_path) or os.path.isfile(single_path + ".zst"):
        weights = open_safetensors_file(single_path)
        return SafetensorsWeights(folder, weights.entries)
    raise FileNotFoundError(
        f"{folder} holds none of {SAFETENSORS_SINGLE}, {SAFETENSORS_SINGLE}.zst or {SAFETENSORS_INDEX}; is it the "
        "right weight folder?"
    )
