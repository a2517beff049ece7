"""Input/output: the Parquet spectra store, wavelength grids (survey loaders join here)."""
from .store import Partition, SpectraStore, open_store, write_store

__all__ = ["Partition", "SpectraStore", "open_store", "write_store"]
