"""Where the tool keeps its files, and atomic file output: nothing it writes is ever seen half-written."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $QLORA_KIT_CACHE, else ~/.cache/qlora-kit."""
    root = cache_dir or os.environ.get("QLORA_KIT_CACHE") or Path.home() / ".cache" / "qlora-kit"
    return Path(root).expanduser()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it becomes `path`, on error it vanishes.

    Raises:
        FileExistsError: when `path` exists and overwrite is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (use --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = _umask()
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any new folder
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        _fsync_dir(tmp)
        if path.exists():
            # A folder cannot be replaced in one rename: move the old one aside first, so at every
            # moment `path` is either the complete old folder, absent, or the complete new one.
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / "x", path)  # put the old folder back
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary file name beside `path`; on success it replaces `path` (flushed first), on error it
    vanishes. Raises FileExistsError when `path` exists and overwrite is False."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (use --force to replace it)")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; the export is one file")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield Path(tmp)
        _fsync(Path(tmp))
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file through a temporary name in the same folder, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    """Flush a folder's files and the folder itself, so a crash after the rename finds them whole."""
    for p in path.rglob("*"):
        if p.is_file():
            _fsync(p)
    _fsync(path)


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


class ShardWriter:
    """safetensors shards written as tensors arrive, holding none of them in memory.

    A shard's tensor bytes go straight to a body file; when the shard is full (or at close) its header is
    written to the shard's file and the body copied after it. Names follow transformers' layout:
    model.safetensors, or model-0000k.safetensors shards with model.safetensors.index.json.
    Raises OSError with one line (the folder and the free space) when the disk fills up.
    """

    def __init__(self, folder: Path, max_shard_bytes: int, metadata: dict[str, str] | None = None):
        self.folder, self.max = Path(folder), max_shard_bytes
        self.metadata = metadata or {"format": "pt"}
        self.shards: list[tuple[str, list[str]]] = []
        self.keys: set[str] = set()
        self.body = None
        self.entries: dict[str, dict] = {}
        self.size = 0
        self.total = 0

    def add(self, key: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        """Append one tensor, cast to `dtype` on the way (a slice at a time: no whole cast copy in memory)."""
        if key in self.keys:
            raise ValueError(f"tensor {key!r} written twice")
        dtype = dtype or tensor.dtype
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {key!r}: dtype {dtype} cannot be stored in safetensors")
        t = tensor.detach().to("cpu").reshape(-1)
        nbytes = t.numel() * dtype.itemsize
        if self.entries and self.size + nbytes > self.max:
            self._close_shard()
        if self.body is None:
            self.body = tempfile.TemporaryFile(dir=self.folder)
        for piece in t.split(1 << 22):
            piece = piece.to(dtype).contiguous()
            self._guard(lambda p=piece: self.body.write(p.view(torch.uint8).numpy().data), "model.safetensors")
        self.entries[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(tensor.shape),
                             "data_offsets": [self.size, self.size + nbytes]}
        self.size += nbytes
        self.total += nbytes
        self.keys.add(key)

    def _close_shard(self) -> None:
        name = f"model-{len(self.shards) + 1:05d}.safetensors"
        header = json.dumps({"__metadata__": self.metadata, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned

        def write() -> None:
            with open(self.folder / name, "wb") as f:
                f.write(struct.pack("<Q", len(header)))
                f.write(header)
                self.body.seek(0)
                shutil.copyfileobj(self.body, f, 16 * 2**20)

        self._guard(write, name)
        self.body.close()
        self.shards.append((name, list(self.entries)))
        self.body, self.entries, self.size = None, {}, 0

    def _guard(self, fn, name: str) -> None:
        try:
            fn()
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                free = shutil.disk_usage(self.folder).free
                raise OSError(e.errno, f"{self.folder.parent}: disk full while writing {name} "
                                       f"({free / 2**20:.0f} MiB free; the export needs about "
                                       f"{self.total / 2**20:.0f} MiB so far); nothing was written") from None
            raise

    def close(self) -> list[str]:
        """Finish the last shard and write the index; returns the files written."""
        if self.entries or not self.shards:
            self._close_shard()
        if len(self.shards) == 1:
            os.replace(self.folder / self.shards[0][0], self.folder / "model.safetensors")
            return ["model.safetensors"]
        index = {"metadata": {"total_size": self.total},
                 "weight_map": {k: name for name, keys in self.shards for k in keys}}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return [name for name, _ in self.shards]
