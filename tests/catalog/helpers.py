"""Helpers for catalog tests: a writable catalog copy, a file system that counts opened files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.fs as pafs

from distlabels import paths

# compact's max_rows for the 3,000-row mock catalog (192 pixels at order 2, ~16 rows each, ~63 per
# order-1 pixel): about half the order-1 pixels fit and are merged, the rest stay at order 2
MIXED_MAX_ROWS = 62


def copy_catalog(src: Path, dst: Path, *, with_meta: bool = True) -> Path:
    """A writable copy of a catalog; with its catalog-level (HATS) files written by distlabels."""
    from distlabels.catalog.writer import write_catalog_meta

    shutil.copytree(src, dst)
    if with_meta:
        meta = json.loads((dst / paths.CATALOG_META).read_text())
        write_catalog_meta(dst, meta)
    return dst


class CountingHandler(pafs.FileSystemHandler):
    """The local file system, recording every file opened for reading (pyarrow.fs.PyFileSystem)."""

    def __init__(self):
        self.fs = pafs.LocalFileSystem()
        self.opened: list[str] = []

    def __eq__(self, other):
        return other is self

    def __ne__(self, other):
        return other is not self

    def get_type_name(self):
        return "counting-local"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths_):
        return self.fs.get_file_info(paths_)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("not allowed in tests")

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        self.opened.append(path)
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        self.opened.append(path)
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)
