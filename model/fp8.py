"""Convert a DeepSeek-V3 FP8 checkpoint (Hugging Face layout) to BF16.

The release stores most 2-D weights as ``float8_e4m3fn`` next to a float32 ``<name>_scale_inv`` of
shape ``[ceil(M/128), ceil(N/128)]``: one factor per 128x128 block, edge blocks partial. Dequantising
multiplies, as DeepSeek's own ``inference/fp8_cast_bf16.py`` does::

    bf16[i, j] = bf16(float32(w[i, j]) * scale_inv[i // 128, j // 128])

Every shard's header is checked before anything is written (a truncated shard, an index that does not
match its shards, a missing or misshapen scale fail in seconds, naming the file). The conversion then
streams one shard at a time (peak memory stays near one shard), drops every ``*_scale_inv`` tensor,
copies all other tensors unchanged, and writes into a staging directory ``.DST.partial`` beside DST
that is renamed to DST only once everything is written; on failure it is removed.

    moe-convert-fp8 SRC DST [--overwrite]      (or: python -m model.fp8 SRC DST)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

BLOCK_SIZE = 128
SCALE_SUFFIX = "_scale_inv"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FP8_HEADER_DTYPES = frozenset({"F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2", "F8_E5M2FNUZ"})  # safetensors' names
# Not copied: rewritten or replaced by the conversion, or Hugging Face download bookkeeping about src's files.
_NOT_COPIED = {INDEX_NAME, "config.json", ".cache"}
# Marks a staging directory as this converter's, so a stale one may be removed and nothing else ever is.
_STAGING_MARKER = ".moe-convert-fp8-staging"
# What reading a shard raises for a truncated or corrupt file (not RuntimeError: torch running out of memory).
_READ_ERRORS = (SafetensorError, OSError, ValueError, TypeError, KeyError)
_INDEX_SHAPE = '{"weight_map": {"<tensor name>": "<shard>.safetensors", ...}}'


class ConvertError(ValueError):
    """A bad input, output path or option. ``str()`` is ``"<file or option>: <problem>"``, the CLI's error line."""

    def __init__(self, where: object, problem: str):
        super().__init__(f"{where}: {problem}")


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


def _detail(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__


def _unreadable(path: Path, exc: BaseException) -> ConvertError:
    return ConvertError(path, f"not a readable safetensors file ({_detail(exc)}); it may be truncated or corrupt: "
                              "copy or download it again")


def _open(path: Path):
    """``safe_open`` that names ``path`` when it fails (safetensors' own messages do not)."""
    try:
        return safe_open(path, framework="pt")
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from None


def _tensor(handle, path: Path, name: str) -> torch.Tensor:
    try:
        return handle.get_tensor(name)
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from None


def _header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (safetensors dtype, shape) from the file's header, without reading any tensor data."""
    with _open(path) as f:
        try:
            return {n: (f.get_slice(n).get_dtype(), list(f.get_slice(n).get_shape())) for n in f.keys()}  # noqa: SIM118
        except _READ_ERRORS as exc:
            raise _unreadable(path, exc) from None


def _read_json(path: Path, expected: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ConvertError(path, f"not valid JSON ({_detail(exc)}); expected {expected}") from None
    if not isinstance(data, dict):
        raise ConvertError(path, f"holds a JSON {type(data).__name__}; expected {expected}")
    return data


def _shard_map(src: Path) -> tuple[dict[str, str], dict, bool]:
    """(tensor name -> shard file, index metadata, has_index) for a checkpoint directory; the map is
    empty for a single ``model.safetensors``."""
    index_path = src / INDEX_NAME
    if index_path.is_file():
        index = _read_json(index_path, _INDEX_SHAPE)
        weight_map, meta = index.get("weight_map"), index.get("metadata") or {}
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConvertError(index_path, f'has no "weight_map" object with entries; expected {_INDEX_SHAPE}')
        if not isinstance(meta, dict):
            raise ConvertError(index_path, '"metadata" must be a JSON object')
        by_shard: dict[str, str] = {}
        for name, shard in weight_map.items():
            if not (isinstance(shard, str) and shard.endswith(".safetensors") and "/" not in shard
                    and "\\" not in shard and not shard.startswith(".")):
                raise ConvertError(index_path, f"weight_map[{name!r}] is {shard!r}; expected the name of a shard "
                                               "file in this directory, e.g. model-00001-of-00002.safetensors")
            by_shard.setdefault(shard, name)
        for shard, example in sorted(by_shard.items()):
            if not (src / shard).is_file():
                raise ConvertError(src / shard, f"missing: {INDEX_NAME} lists it (e.g. for {example}); "
                                                "copy the complete checkpoint")
        return weight_map, dict(meta), True
    if (src / SINGLE_NAME).is_file():
        return {}, {}, False
    others = sorted(p.name for p in src.glob("*.safetensors"))
    found = f" (found {len(others)} other *.safetensors file(s), e.g. {others[0]}, but no index for them)" if others else ""
    raise ConvertError(src, f"holds neither {INDEX_NAME} nor {SINGLE_NAME}{found}; expected a Hugging Face "
                            "checkpoint directory")


def _inspect(src: Path, shards: list[str], weight_map: dict[str, str], block_size: int):
    """Check every shard's header before anything is written; returns (headers, FP8 weight -> shard of its scale).

    A truncated shard, an index that disagrees with its shards, or a missing or misshapen scale thus
    fails in seconds instead of after hours of converting the shards before it.
    """
    headers = {shard: _header(src / shard) for shard in shards}
    listed: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        listed.setdefault(shard, []).append(name)
    scale_at: dict[str, str] = {}
    for shard, header in headers.items():
        path = src / shard
        absent = [n for n in listed.get(shard, ()) if n not in header]
        if absent:
            raise ConvertError(path, f"lacks {len(absent)} tensor(s) that {INDEX_NAME} puts in it, e.g. {absent[0]}; "
                                     "the index and the shards must come from the same checkpoint")
        for name, (dtype, shape) in header.items():
            if weight_map.get(name, shard) != shard:
                raise ConvertError(path, f"holds {name}, which {INDEX_NAME} puts in {weight_map[name]}; the index "
                                         "and the shards must come from the same checkpoint")
            if dtype not in FP8_HEADER_DTYPES or name.endswith(SCALE_SUFFIX):
                continue
            scale = name + SCALE_SUFFIX
            where = shard if scale in header else weight_map.get(scale)
            if where is None or scale not in headers.get(where, {}):
                elsewhere = (f", nor in {where}, where {INDEX_NAME} puts it" if where else
                             f", and {INDEX_NAME} does not list it" if weight_map else "")
                raise ConvertError(path, f"FP8 tensor {name} has no {scale}: it is not in this file{elsewhere}")
            if len(shape) != 2:
                raise ConvertError(path, f"FP8 tensor {name} has shape {shape}; expected a 2-D weight")
            want = [math.ceil(shape[0] / block_size), math.ceil(shape[1] / block_size)]
            if headers[where][scale][1] != want:
                raise ConvertError(src / where, f"{scale} has shape {headers[where][scale][1]}; FP8 tensor {name} "
                                                f"{shape} with {block_size}x{block_size} blocks needs {want}")
            scale_at[name] = where
    return headers, scale_at


def _check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such directory; expected the FP8 checkpoint directory "
                                f"(holding {INDEX_NAME} or {SINGLE_NAME})")
    if not src.is_dir():
        raise ConvertError(src, f"not a directory; expected the FP8 checkpoint directory (holding {INDEX_NAME} "
                                f"or {SINGLE_NAME})")
    s, d = src.resolve(), dst.resolve()
    if s == d or s in d.parents or d in s.parents:
        raise ConvertError(dst, f"lies inside the source {src} (or contains it); choose an output directory outside it")
    if dst.is_symlink():
        raise ConvertError(dst, "is a symbolic link; give the real directory path")
    if dst.exists() and not dst.is_dir():
        raise ConvertError(dst, "exists and is not a directory; choose a new directory")
    if dst.is_dir() and any(dst.iterdir()):
        if not overwrite:
            raise ConvertError(dst, "exists and is not empty; choose a new or empty directory "
                                    "(or pass --overwrite to replace an earlier output)")
        if not any(dst.glob("*.safetensors")):
            raise ConvertError(dst, "holds no *.safetensors files, so it is not an earlier output and --overwrite "
                                    "leaves it alone; choose a new or empty directory")


def _bf16_config(path: Path) -> str | None:
    """config.json without ``quantization_config``, dtype keys (where present) set to bfloat16; None without one."""
    if not path.exists():
        return None
    cfg = _read_json(path, "the model's config object")
    cfg.pop("quantization_config", None)
    for key in ("torch_dtype", "dtype"):
        if key in cfg:
            cfg[key] = "bfloat16"
    return json.dumps(cfg, indent=2) + "\n"


def _copy_extras(src: Path, out: Path) -> None:
    """Copy every file or folder other than shards, the index and config.json unchanged."""
    for item in sorted(src.iterdir()):
        if item.name in _NOT_COPIED or (item.is_file() and item.name.endswith(".safetensors")):
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name, symlinks=False)
        else:
            shutil.copy2(item, out / item.name)


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, run by someone else
        return True
    return True


def _clear_stale_staging(staging: Path, log: Callable[[str], object]) -> None:
    """Remove a staging directory an interrupted run of ours left (it holds our marker).

    Anything else at that path is refused, never removed; so is the staging directory of a conversion
    still running on this host.
    """
    if staging.is_symlink() or (staging.exists() and not (staging / _STAGING_MARKER).is_file()):
        raise ConvertError(staging, "exists and is not a moe-convert-fp8 staging directory, so it is left alone; "
                                    "move it away or choose another DST")
    if staging.exists():
        try:
            owner = json.loads((staging / _STAGING_MARKER).read_text())
        except ValueError:
            owner = None
        owner = owner if isinstance(owner, dict) else {}
        if owner.get("host") == socket.gethostname() and _pid_alive(owner.get("pid")):
            raise ConvertError(staging, f"another moe-convert-fp8 (pid {owner['pid']}) is writing it; wait for it "
                                        "to finish (if none is running, delete this directory)")
        log(f"moe-convert-fp8: removing {staging}, the staging directory of an interrupted conversion; starting again")
        shutil.rmtree(staging)


def _move_into_place(staging: Path, dst: Path, overwrite: bool) -> None:
    """Rename ``staging`` to ``dst``. An earlier output (``overwrite``) is moved aside first and deleted only
    after the rename; files that appeared in an empty ``dst`` during the run are never replaced."""
    (staging / _STAGING_MARKER).unlink()
    if not (dst.is_dir() and any(dst.iterdir())):
        staging.rename(dst)
        return
    if not overwrite:
        raise ConvertError(dst, "files appeared in it during the conversion, so it was left alone; "
                                "run again with a new or empty directory")
    aside = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    dst.rename(aside / dst.name)
    try:
        staging.rename(dst)
    except BaseException:
        (aside / dst.name).rename(dst)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def convert_fp8_to_bf16(src: str | Path, dst: str | Path, *, block_size: int = BLOCK_SIZE, overwrite: bool = False,
                        log: Callable[[str], object] = print) -> dict:
    """Write a BF16 copy of the FP8 checkpoint ``src`` to ``dst``; returns a summary dict.

    Summary keys: shards, dequantized, copied (non-FP8 tensors), dropped_scales, seconds.
    Raises FileNotFoundError for a missing ``src``, ConvertError (a ValueError naming the file) for a bad
    checkpoint, a bad ``dst`` or a non-empty one (unless ``overwrite`` and it holds an earlier output),
    and OSError when writing fails. ``src`` is only read; ``dst`` appears complete or not at all.
    """
    t0 = time.perf_counter()
    if not isinstance(block_size, int) or block_size < 1:
        raise ConvertError("block_size", f"must be a positive integer (DeepSeek-V3 uses {BLOCK_SIZE}), got {block_size!r}")
    src, dst = Path(src), Path(os.path.abspath(dst))
    _check_paths(src, dst, overwrite)
    weight_map, index_meta, has_index = _shard_map(src)
    shards = sorted(set(weight_map.values())) if has_index else [SINGLE_NAME]
    config = _bf16_config(src / "config.json")
    headers, scale_at = _inspect(src, shards, weight_map, block_size)

    staging = dst.parent / f".{dst.name}.partial"
    made = [p for p in (dst.parent, *dst.parent.parents) if not p.exists()]  # parents we create, deepest first
    _clear_stale_staging(staging, log)
    counts = {"dequantized": 0, "copied": 0, "dropped_scales": 0}
    out_map: dict[str, str] = {}
    total_size, created = 0, False
    try:
        staging.mkdir(parents=True)  # fails if another run created it meanwhile: then it is not ours to remove
        created = True
        marker = {"pid": os.getpid(), "host": socket.gethostname(), "src": str(src)}
        (staging / _STAGING_MARKER).write_text(json.dumps(marker) + "\n")
        for i, shard in enumerate(shards, 1):
            path, out = src / shard, {}
            with _open(path) as f:
                for name in sorted(headers[shard]):
                    if name.endswith(SCALE_SUFFIX):
                        counts["dropped_scales"] += 1
                        continue
                    tensor = _tensor(f, path, name)
                    if name in scale_at:
                        where = scale_at[name]
                        if where == shard:
                            scale = _tensor(f, path, name + SCALE_SUFFIX)
                        else:
                            with _open(src / where) as g:
                                scale = _tensor(g, src / where, name + SCALE_SUFFIX)
                        tensor = dequantize(tensor, scale, block_size)  # shapes checked by _inspect
                        del scale
                        _release_freed_memory()  # the FP8 input and float32 scratch just freed
                        counts["dequantized"] += 1
                    else:
                        counts["copied"] += 1
                    out[name] = tensor
                    del tensor
            try:
                save_file(out, staging / shard, metadata={"format": "pt"})
            except (SafetensorError, OSError) as exc:  # safetensors reports a full disk as its own error
                raise ConvertError(dst, f"writing {shard} failed ({_detail(exc)}); nothing was written") from None
            for name, t in out.items():
                out_map[name] = shard
                total_size += t.numel() * t.element_size()
            log(f"[{i}/{len(shards)}] {shard}: {len(out)} tensors")
            del out  # free this shard before the next one
            _release_freed_memory()

        if has_index:
            index = {"metadata": {**index_meta, "total_size": total_size}, "weight_map": dict(sorted(out_map.items()))}
            (staging / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if config is not None:
            (staging / "config.json").write_text(config)
        _copy_extras(src, staging)
        _move_into_place(staging, dst, overwrite)
    except BaseException:
        if created:
            shutil.rmtree(staging, ignore_errors=True)
        for p in made:
            try:
                p.rmdir()
            except OSError:
                break
        raise
    return {"shards": len(shards), **counts, "seconds": round(time.perf_counter() - t0, 3)}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, like every other error (argparse's own adds a usage line first)."""
        usage = " ".join(self.format_usage().split()[1:])
        self.exit(2, f"{self.prog}: error: {message} (usage: {usage})\n")


def main(argv: list[str] | None = None) -> int:
    """CLI: ``moe-convert-fp8 SRC DST [--overwrite]``. Returns 0 on success, 2 on error.

    Progress goes to stdout; stderr gets nothing but the one error line, ``moe-convert-fp8: error: <file>: <problem>``.
    """
    parser = _Parser(prog="moe-convert-fp8", description="Convert a DeepSeek-V3 FP8 checkpoint (HF format) to BF16.")
    parser.add_argument("src", type=Path, help="FP8 checkpoint directory (model.safetensors[.index.json], config.json, ...)")
    parser.add_argument("dst", type=Path, help="output directory for the BF16 checkpoint (new or empty)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DST if it holds an earlier output (*.safetensors); only once the new one is complete")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors and --help: the message is already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        s = convert_fp8_to_bf16(args.src, args.dst, overwrite=args.overwrite, log=lambda msg: print(msg, flush=True))
    except OSError as exc:
        msg = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
    except ValueError as exc:  # ConvertError
        msg = str(exc)
    else:
        print(f"moe-convert-fp8: wrote {args.dst}: {s['shards']} shards, {s['dequantized']} tensors dequantized, "
              f"{s['copied']} copied, {s['dropped_scales']} scales dropped in {s['seconds']:.1f} s")
        return 0
    print(f"moe-convert-fp8: error: {' '.join(msg.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
