"""Writing a model's safetensors files while its tensors are still being read (what `magi-convert` does).

The names, shapes and dtypes of every tensor are known before any data is read (`streaming.plan_component`), so the
shards and their headers are laid out up front and each tensor is appended to its file as it arrives and then
dropped: a conversion holds one tensor at a time, whatever the model's size. The files are the ones
`save_pretrained` writes (`<name>.safetensors`, or `<name>-0000k-of-0000n.safetensors` with
`<name>.safetensors.index.json` above `max_shard_size`).
"""

import json
import os
import struct
from typing import Dict, List, Optional, Union

import torch

from .original_checkpoint import SAFETENSORS_DTYPES

_DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class StreamingShardWriter:
    """Safetensors shards laid out from meta tensors, filled in order with `write` and finished with `close`.

    Args:
        folder (`str`): the folder to write into (it must exist).
        weights_name (`str`): `"diffusion_pytorch_model.safetensors"` (Diffusers models) or `"model.safetensors"`
            (transformers models).
        layout (`Dict[str, torch.Tensor]`): every tensor to write, in the order `write` will receive them, as tensors
            (meta is fine) of their final shape and dtype.
        max_shard_size (`int` or `str`): shards are cut before a tensor that would make them larger.
    """

    def __init__(
        self, folder: str, weights_name: str, layout: Dict[str, torch.Tensor], max_shard_size: Union[int, str]
    ):
        from accelerate.utils import convert_file_size_to_int

        limit = convert_file_size_to_int(max_shard_size)
        shards: List[List[str]] = [[]]
        size = 0
        for name, tensor in layout.items():
            if shards[-1] and size + _nbytes(tensor) > limit:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += _nbytes(tensor)
        stem = weights_name[: -len(".safetensors")]
        if len(shards) == 1:
            self.file_names = [weights_name]
        else:
            self.file_names = [f"{stem}-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        self.index_name = f"{weights_name}.index.json" if len(shards) > 1 else None
        self.folder = folder
        self.layout = layout
        self.shards = shards
        self.total_size = sum(_nbytes(tensor) for tensor in layout.values())
        self._order = [name for shard in shards for name in shard]
        self._shard_of = {name: k for k, names in enumerate(shards) for name in names}
        self._next = 0
        self._shard = -1
        self._file = None

    def _open_shard(self, shard: int) -> None:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in self.shards[shard]:
            tensor = self.layout[name]
            header[name] = {
                "dtype": _DTYPE_CODES[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + _nbytes(tensor)],
            }
            offset += _nbytes(tensor)
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._file = open(os.path.join(self.folder, self.file_names[shard]), "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._shard = shard

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append `name`'s data; tensors must come in the layout's order, with its shapes and dtypes."""
        expected = self._order[self._next] if self._next < len(self._order) else None
        planned = self.layout.get(name)
        if name != expected or planned is None or planned.shape != tensor.shape or planned.dtype != tensor.dtype:
            raise RuntimeError(f"StreamingShardWriter expected {expected}, got {name} {tuple(tensor.shape)}.")
        shard = self._shard_of[name]
        if shard != self._shard:
            if self._file is not None:
                self._file.close()
            self._open_shard(shard)
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._file.write(memoryview(data.view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> Optional[str]:
        """Close the last shard and write the index (when sharded); returns the index path or `None`."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._next != len(self._order):
            raise RuntimeError(f"StreamingShardWriter: {len(self._order) - self._next} tensor(s) were never written.")
        if self.index_name is None:
            return None
        weight_map = {name: self.file_names[k] for k, names in enumerate(self.shards) for name in names}
        path = os.path.join(self.folder, self.index_name)
        with open(path, "w", encoding="utf-8") as file:
            json.dump({"metadata": {"total_size": self.total_size}, "weight_map": weight_map}, file, indent=2)
        return path

    def abort(self) -> None:
        """Close an open file after a failure (the caller removes the folder)."""
        if self._file is not None:
            self._file.close()
            self._file = None
