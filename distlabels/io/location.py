"""Where a catalog lives: a local (or shared) file system path, or an fsspec URL (object storage).

Exactly-once output needs a write that is either complete or absent, and a durable sign that it
completed. The two kinds of storage get there differently:

- **Plain path** (local disk, NFS, a Kubernetes ReadWriteMany volume): the fragment is written
  under a hidden temporary name, fsynced and renamed into place (:func:`..io.store.write_fragment`).
  A rename is atomic, so the fragment's presence is its completion.
- **fsspec URL** (``s3://``, ``gs://``, ``abfs://``; also ``file://`` and ``memory://``): object
  stores have no rename, so the fragment is written once as a whole object (one ``pipe_file`` of
  the complete bytes, a single PUT), then a small completion marker ``_done/<fragment>.json``
  (size, rows, sha256) is written. A fragment counts as done only when its marker is there and
  matches its size, so a write torn by a crash (possible on ``file://``, where a "PUT" is an
  ordinary file write) is simply redone by the next run.

Both strategies write every fragment under a deterministic name, so a retried or duplicated task
rewrites the same bytes to the same place: no row can appear twice.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .. import paths
from ..errors import StoreError
from .store import _json_default, write_fragment, write_json_atomic

_CACHE: dict[str, "Location"] = {}


@dataclass
class Location:
    """A catalog root: ``url`` as the user gave it; ``fs``/``root`` for fsspec URLs, ``path`` for paths."""

    url: str
    fs: Any = None            # fsspec filesystem (URL) or None (plain path)
    root: str = ""            # path inside ``fs`` (URL) ; unused for plain paths
    path: Path | None = None  # plain path

    @classmethod
    def parse(cls, location: str | os.PathLike) -> "Location":
        text = os.fspath(location)
        if not paths.is_url(text):
            path = Path(text).absolute()      # workers may run elsewhere: never a path relative to our cwd
            return cls(url=str(path), path=path)
        import fsspec

        try:
            fs, root = fsspec.core.url_to_fs(text)
        except (ImportError, ValueError) as e:
            raise StoreError(f"cannot open {text} through fsspec ({type(e).__name__}: {e}).") from None
        return cls(url=text.rstrip("/"), fs=fs, root=root.rstrip("/"))

    @classmethod
    def cached(cls, location: str) -> "Location":
        """Parse once per process (tasks on a worker share the fsspec client and its connections)."""
        loc = _CACHE.get(location)
        if loc is None:
            loc = _CACHE[location] = cls.parse(location)
        return loc

    # ------------------------------------------------------------------ basics
    @property
    def is_url(self) -> bool:
        return self.fs is not None

    @property
    def strategy(self) -> str:
        """``rename`` (plain path: temp + fsync + atomic rename) or ``put`` (whole object + marker)."""
        return "put" if self.is_url else "rename"

    def __str__(self) -> str:
        return self.url

    def _abs(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if self.is_url else str(self.path / rel)

    def exists(self, rel: str = "") -> bool:
        if not self.is_url:
            return (self.path / rel).exists() if rel else self.path.exists()
        return self.fs.exists(self._abs(rel) if rel else self.root)

    def is_empty(self) -> bool:
        if not self.is_url:
            return not self.path.exists() or not any(self.path.iterdir())
        return not self.fs.exists(self.root) or not self.fs.ls(self.root, detail=False)

    def mkdir(self) -> None:
        if self.is_url:
            self.fs.makedirs(self.root, exist_ok=True)
        else:
            self.path.mkdir(parents=True, exist_ok=True)

    def remove_all(self) -> None:
        """Delete the whole root (``--overwrite``)."""
        if not self.is_url:
            shutil.rmtree(self.path, ignore_errors=True)
        elif self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)

    def remove(self, rel: str) -> None:
        if not self.is_url:
            (self.path / rel).unlink(missing_ok=True)
        elif self.fs.exists(self._abs(rel)):
            self.fs.rm(self._abs(rel))

    def local_path(self) -> Path | None:
        """A local path for this location when it is on a local file system (plain or ``file://``)."""
        if not self.is_url:
            return self.path
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return Path(self.root) if protocol in ("file", "local") else None

    # ------------------------------------------------------------------ small files
    def read_text(self, rel: str) -> str:
        if not self.is_url:
            return (self.path / rel).read_text()
        with self.fs.open(self._abs(rel), "rb") as f:
            return f.read().decode()

    def write_json(self, rel: str, obj: Any) -> None:
        """Small run files (``_run.json``...): atomic rename on a path, one PUT on object storage."""
        if not self.is_url:
            write_json_atomic(self.path / rel, obj)
            return
        self._put(rel, json.dumps(obj, indent=1, default=_json_default).encode())

    def write_bytes(self, rel: str, data: bytes) -> None:
        if not self.is_url:
            final = self.path / rel
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = paths.temp_path(final, f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            return
        self._put(rel, data)

    def _put(self, rel: str, data: bytes) -> None:
        path = self._abs(rel)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)   # a no-op on object stores
        self.fs.pipe_file(path, data)                                 # the whole object in one write

    # ------------------------------------------------------------------ fragments
    def write_table(self, rel: str, table: pa.Table, metadata: dict[str, str] | None = None) -> None:
        """Write one fragment exactly once (see the module docstring for the two strategies)."""
        if not self.is_url:
            write_fragment(table, self.path / rel, metadata)
            return
        if metadata:
            table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                                   **{k.encode(): v.encode() for k, v in metadata.items()}})
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        self._put(rel, data)
        marker = {"fragment": rel, "bytes": len(data), "n_rows": table.num_rows,
                  "sha256": hashlib.sha256(data).hexdigest()}
        self._put(marker_rel(rel), json.dumps(marker).encode())

    def is_complete(self, rel: str) -> bool:
        """True when fragment ``rel`` was written completely (path: present; URL: marker matches)."""
        if not self.is_url:
            return (self.path / rel).exists()
        try:
            marker = json.loads(self.read_text(marker_rel(rel)))
            return int(self.fs.size(self._abs(rel))) == int(marker["bytes"])
        except (FileNotFoundError, KeyError, ValueError):
            return False

    def completed(self) -> set[str]:
        """Relative paths of every complete fragment, from listings and one batched read of the markers."""
        if not self.is_url:
            return {p.relative_to(self.path).as_posix() for p in paths.list_fragments(self.path)}
        sizes = {rel: size for rel, size in self._find(paths.DATASET_DIR, sizes=True).items()
                 if rel.endswith(".parquet") and not posixpath.basename(rel).startswith((".", "_"))}
        markers = [rel for rel in self._find(paths.DONE_DIR)
                   if rel[len(paths.DONE_DIR) + 1:-len(".json")] in sizes]
        if not markers:
            return set()
        blobs = self.fs.cat([self._abs(m) for m in markers])      # concurrent on async stores (s3fs, gcsfs)
        done = set()
        for m in markers:
            frag = m[len(paths.DONE_DIR) + 1:-len(".json")]
            try:
                if int(json.loads(blobs[self._abs(m)])["bytes"]) == int(sizes[frag]):
                    done.add(frag)
            except (KeyError, ValueError, TypeError):
                pass                                              # unreadable marker: redo the fragment
        return done

    def fragments(self) -> list[str]:
        """Relative paths of every visible fragment under ``dataset/``, sorted (complete or not)."""
        if not self.is_url:
            return [p.relative_to(self.path).as_posix() for p in paths.list_fragments(self.path)]
        return sorted(rel for rel in self._find(paths.DATASET_DIR)
                      if rel.endswith(".parquet") and not posixpath.basename(rel).startswith((".", "_")))

    def _find(self, rel_dir: str, sizes: bool = False):
        """Files under ``rel_dir`` as relative paths (a dict rel -> bytes when ``sizes``)."""
        base = self._abs(rel_dir)
        if not self.fs.exists(base):
            return {} if sizes else []
        prefix = self.root.rstrip("/") + "/"
        found = self.fs.find(base, detail=True)
        out = {}
        for p, info in found.items():
            p = p if p.startswith(prefix) else posixpath.join(self.root, p.lstrip("/"))
            out[p[len(prefix):]] = info.get("size")
        return out if sizes else sorted(out)

    def clean_temps(self) -> int:
        """Remove temporary files left by writers that died (only on paths: object stores have none)."""
        if self.is_url or not (self.path / paths.DATASET_DIR).is_dir():
            return 0
        n = 0
        for p in (self.path / paths.DATASET_DIR).rglob(".*.tmp"):
            p.unlink(missing_ok=True)
            n += 1
        return n

    def parquet_rows(self, rel: str) -> int:
        return self.parquet_file(rel).metadata.num_rows

    def parquet_file(self, rel: str) -> pq.ParquetFile:
        if not self.is_url:
            return pq.ParquetFile(self.path / rel)
        return pq.ParquetFile(self.fs.open(self._abs(rel), "rb"))

    def arrow_filesystem(self):
        """(pyarrow filesystem or None, function rel -> path) for ``pyarrow.dataset``."""
        if not self.is_url:
            return None, lambda rel: str(self.path / rel)
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return PyFileSystem(FSSpecHandler(self.fs)), self._abs


def marker_rel(fragment_rel: str) -> str:
    """Completion marker of a fragment written on object storage: ``_done/<fragment>.json``."""
    return f"{paths.DONE_DIR}/{fragment_rel}.json"


__all__ = ["Location", "marker_rel"]
