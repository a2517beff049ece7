"""distlabels: stellar labels for every star of a spectroscopic survey.

Layers, each importing only those before it: ``io`` (survey loaders, Parquet store), ``models``
(emulators behind one interface), ``fit`` (the batched torch kernel), ``catalog`` (write, query,
plot), ``pipeline`` (Dask), ``cli``.
"""
__version__ = "0.1.0"


def open_catalog(path, **kwargs):
    """Open a label catalog: ``.query(where=, cone=, columns=, clean=, limit=) -> pyarrow.Table``
    (see :class:`distlabels.catalog.query.Catalog`)."""
    from .catalog.query import open_catalog as _open

    return _open(path, **kwargs)


__all__ = ["__version__", "open_catalog"]
