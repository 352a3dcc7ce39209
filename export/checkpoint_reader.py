"""Read regions of tensors from a moe-launch DCP checkpoint, in one process, without a model.

A checkpoint written by any layout (DP, EP, ETP, TP, SP, PP, VPP) stores each tensor with its global
shape as the chunks its ranks held. :class:`CheckpointReader` asks DCP for an arbitrary region of a
tensor (one expert of a stacked expert tensor, a whole norm weight, ...): DCP's own resharding logic
(``create_read_items_for_chunk_list``) finds the stored chunks that overlap it, and its file reader
copies their overlapping parts into the buffer we hand it. Nothing else is loaded, so memory is the
requested regions plus one stored chunk at a time (one rank's share of one tensor).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

MODEL_PREFIX = "model."  # the trainer saves {"model": ..., "optim": ...}; DCP flattens it to "model.<name>"


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


class _RegionPlanner(LoadPlanner):
    """Loads the requested regions ({fqn: (offsets, destination tensor)}) and nothing else."""

    def __init__(self, requests: dict[str, tuple[tuple[int, ...], torch.Tensor]]):
        self.requests = requests

    def set_up_planner(self, state_dict, metadata: Metadata | None = None, is_coordinator: bool = False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items: list[ReadItem] = []
        for fqn, (offsets, dest) in self.requests.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            items += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value) -> None:
        raise RuntimeError(f"{read_item.dest_index.fqn} is not a tensor")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        dest = self.requests[read_item.dest_index.fqn][1]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor handed out a view of the destination: the data is already in place


class _Reader(dcp.FileSystemReader):
    """A file reader that reads ``.metadata`` once (dcp.load asks for it on every call)."""

    _metadata: Metadata | None = None

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


class CheckpointReader:
    """The model tensors of one checkpoint directory (``step-XXXXXXXX``), by our parameter names."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._reader = _Reader(str(self.path))
        md = self._reader.read_metadata()
        self.tensors: dict[str, TensorInfo] = {
            fqn[len(MODEL_PREFIX):]: TensorInfo(tuple(m.size), m.properties.dtype)
            for fqn, m in md.state_dict_metadata.items()
            if fqn.startswith(MODEL_PREFIX) and isinstance(m, TensorStorageMetadata)
        }

    def read(self, regions: dict[str, tuple[slice, ...] | None], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{name: region} -> {name: tensor}; a region is a tuple of slices over the leading dimensions
        (None: the whole tensor). Values come in the checkpoint's dtype unless ``dtype`` is given."""
        requests = {}
        for name, region in regions.items():
            info = self.tensors[name]
            region = tuple(region or ()) + (slice(None),) * (len(info.shape) - len(region or ()))
            bounds = [s.indices(n)[:2] for s, n in zip(region, info.shape)]
            dest = torch.empty([b - a for a, b in bounds], dtype=info.dtype)
            requests[MODEL_PREFIX + name] = (tuple(a for a, _ in bounds), dest)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({}, storage_reader=self._reader, planner=_RegionPlanner(requests), no_dist=True)
        return {name[len(MODEL_PREFIX):]: dest if dtype is None else dest.to(dtype) for name, (_, dest) in requests.items()}
