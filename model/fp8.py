"""Convert a DeepSeek-V3 FP8 checkpoint (Hugging Face layout) to BF16.

The release stores most 2-D weights as ``float8_e4m3fn`` next to a float32 ``<name>_scale_inv`` of
shape ``[ceil(M/128), ceil(N/128)]``: one factor per 128x128 block, edge blocks partial. Dequantising
multiplies, as DeepSeek's own ``inference/fp8_cast_bf16.py`` does::

    bf16[i, j] = bf16(float32(w[i, j]) * scale_inv[i // 128, j // 128])

The conversion streams one shard at a time (peak memory stays near one shard), drops every
``*_scale_inv`` tensor, copies all other tensors unchanged, and writes into a hidden ``.partial``
directory that is renamed to the destination only once everything is written.

    moe-convert-fp8 SRC DST [--overwrite]      (or: python -m model.fp8 SRC DST)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

BLOCK_SIZE = 128
SCALE_SUFFIX = "_scale_inv"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FP8_DTYPES = frozenset(
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz") if hasattr(torch, n)
)
# Not copied: rewritten or replaced by the conversion, or Hugging Face download bookkeeping about src's files.
_NOT_COPIED = {INDEX_NAME, "config.json", ".cache"}


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """Block-dequantise a 2-D FP8 ``weight`` [M, N] with ``scale_inv`` [ceil(M/bs), ceil(N/bs)]; returns BF16.

    Multiplies in float32, in place, with the factors broadcast over each block: no per-block loop and
    no full-size scale tensor. Raises ValueError on a shape mismatch.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D FP8 weight, got shape {list(weight.shape)}")
    m, n = weight.shape
    mb, nb = math.ceil(m / block_size), math.ceil(n / block_size)
    if tuple(scale_inv.shape) != (mb, nb):
        raise ValueError(f"scale_inv shape {list(scale_inv.shape)} does not match weight shape {[m, n]} "
                         f"with block size {block_size} (expected {[mb, nb]})")
    w = weight.to(torch.float32)  # exact: every FP8 value is representable in float32
    rows = scale_inv.to(torch.float32).repeat_interleave(block_size, dim=0)[:m]  # [M, Nb]: each row's factors
    full = n // block_size  # whole column blocks, viewed as [M, full, bs] so a row's factor broadcasts per block
    w[:, : full * block_size].view(m, full, block_size).mul_(rows[:, :full, None])
    if full < nb:  # the partial last column block
        w[:, full * block_size :].mul_(rows[:, full:])
    return w.to(torch.bfloat16)


def _load_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only
    except (AttributeError, OSError, TypeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, and RSS creeps up shard by shard)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _shard_map(src: Path) -> tuple[dict[str, str], dict, bool]:
    """(tensor name -> shard file, index metadata, has_index) for a checkpoint directory."""
    index_path = src / INDEX_NAME
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no weight_map")
        for shard in sorted(set(weight_map.values())):
            if not (src / shard).is_file():
                raise ValueError(f"{index_path} names shard {shard}, which is missing from {src}")
        return weight_map, dict(index.get("metadata") or {}), True
    single = src / SINGLE_NAME
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {name: SINGLE_NAME for name in f.keys()}, {}, False
    raise ValueError(f"{src} holds neither {INDEX_NAME} nor {SINGLE_NAME}")


def _check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    if not src.is_dir():
        raise FileNotFoundError(f"source checkpoint directory not found: {src}")
    s, d = src.resolve(), dst.resolve()
    if s == d or s in d.parents or d in s.parents:
        raise ValueError(f"destination {dst} must lie outside the source {src} (and not contain it)")
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"destination {dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ValueError(f"destination {dst} exists and is not empty (pass overwrite=True / --overwrite to replace it)")


def _write_config(src_cfg: Path, dst_cfg: Path) -> None:
    """config.json without ``quantization_config``, dtype keys (where present) set to bfloat16."""
    cfg = json.loads(src_cfg.read_text())
    cfg.pop("quantization_config", None)
    for key in ("torch_dtype", "dtype"):
        if key in cfg:
            cfg[key] = "bfloat16"
    dst_cfg.write_text(json.dumps(cfg, indent=2) + "\n")


def _copy_extras(src: Path, out: Path) -> None:
    """Copy every file or folder other than shards, the index and config.json unchanged."""
    for item in sorted(src.iterdir()):
        if item.name in _NOT_COPIED or (item.is_file() and item.name.endswith(".safetensors")):
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name, symlinks=False)
        else:
            shutil.copy2(item, out / item.name)


def convert_fp8_to_bf16(src: str | Path, dst: str | Path, *, block_size: int = BLOCK_SIZE, overwrite: bool = False,
                        log: Callable[[str], object] = print) -> dict:
    """Write a BF16 copy of the FP8 checkpoint ``src`` to ``dst``; returns a summary dict.

    Summary keys: shards, dequantized, copied (non-FP8 tensors), dropped_scales, seconds.
    Raises FileNotFoundError for a missing ``src`` and ValueError for a bad checkpoint or a non-empty
    ``dst`` (unless ``overwrite``). ``src`` is only read; ``dst`` appears complete or not at all.
    """
    t0 = time.perf_counter()
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    src, dst = Path(src), Path(dst)
    _check_paths(src, dst, overwrite)
    weight_map, index_meta, has_index = _shard_map(src)
    shards = sorted(set(weight_map.values()))

    partial = dst.parent / f".{dst.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)  # left over from an interrupted run
    partial.mkdir(parents=True)
    counts = {"dequantized": 0, "copied": 0, "dropped_scales": 0}
    out_map: dict[str, str] = {}
    total_size = 0
    try:
        for i, shard in enumerate(shards, 1):
            out: dict[str, torch.Tensor] = {}
            with safe_open(src / shard, framework="pt") as f:
                local = set(f.keys())
                for name in sorted(local):
                    if name.endswith(SCALE_SUFFIX):
                        counts["dropped_scales"] += 1
                        continue
                    tensor = f.get_tensor(name)
                    if tensor.dtype in FP8_DTYPES:
                        scale = _read_scale(src, name, shard, local, f, weight_map)
                        try:
                            tensor = dequantize(tensor, scale, block_size)
                        except ValueError as exc:
                            raise ValueError(f"{name}: {exc}") from None
                        del scale
                        _release_freed_memory()  # the FP8 input and float32 scratch just freed
                        counts["dequantized"] += 1
                    else:
                        counts["copied"] += 1
                    out[name] = tensor
                    del tensor
            save_file(out, partial / shard, metadata={"format": "pt"})
            for name, t in out.items():
                out_map[name] = shard
                total_size += t.numel() * t.element_size()
            log(f"[{i}/{len(shards)}] {shard}: {len(out)} tensors")
            del out  # free this shard before the next one
            _release_freed_memory()

        if has_index:
            index = {"metadata": {**index_meta, "total_size": total_size}, "weight_map": dict(sorted(out_map.items()))}
            (partial / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if (src / "config.json").is_file():
            _write_config(src / "config.json", partial / "config.json")
        _copy_extras(src, partial)

        if dst.exists():
            shutil.rmtree(dst)  # empty, or overwrite=True (checked above)
        partial.rename(dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {"shards": len(shards), **counts, "seconds": round(time.perf_counter() - t0, 3)}


def _read_scale(src: Path, name: str, shard: str, local: set[str], handle, weight_map: dict[str, str]) -> torch.Tensor:
    """The ``scale_inv`` of FP8 weight ``name``: from the open shard, or lazily from the shard the index names."""
    scale_name = name + SCALE_SUFFIX
    if scale_name in local:
        return handle.get_tensor(scale_name)
    other = weight_map.get(scale_name)
    if other is None or other == shard:
        raise ValueError(f"FP8 tensor {name} has no {scale_name}")
    with safe_open(src / other, framework="pt") as g:
        if scale_name not in g.keys():
            raise ValueError(f"FP8 tensor {name}: the index puts {scale_name} in {other}, which does not hold it")
        return g.get_tensor(scale_name)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``moe-convert-fp8 SRC DST [--overwrite]``. Returns 0 on success, 2 on error."""
    parser = argparse.ArgumentParser(prog="moe-convert-fp8",
                                     description="Convert a DeepSeek-V3 FP8 checkpoint (HF format) to BF16.")
    parser.add_argument("src", type=Path, help="FP8 checkpoint directory (model.safetensors[.index.json], config.json, ...)")
    parser.add_argument("dst", type=Path, help="output directory for the BF16 checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists and is not empty")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors and --help: argparse has already printed its message
        return exc.code if isinstance(exc.code, int) else 2
    try:
        s = convert_fp8_to_bf16(args.src, args.dst, overwrite=args.overwrite,
                                log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except (ValueError, OSError, SafetensorError) as exc:
        msg = " ".join(str(exc).split())
        print(f"moe-convert-fp8: error: {msg}", file=sys.stderr)
        return 2
    print(f"moe-convert-fp8: wrote {args.dst}: {s['shards']} shards, {s['dequantized']} tensors dequantized, "
          f"{s['copied']} copied, {s['dropped_scales']} scales dropped in {s['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
