"""The label catalog: write fragments and HATS catalog-level files, open and query, compact, plot."""
from .compact import compact_catalog
from .query import CLEAN, Catalog, CleanSelection, format_table, open_catalog, parse_where
from .writer import fragment_done, result_table, write_catalog_fragment, write_catalog_meta

__all__ = ["CLEAN", "Catalog", "CleanSelection", "compact_catalog", "format_table", "fragment_done", "open_catalog",
           "parse_where", "result_table", "write_catalog_fragment", "write_catalog_meta"]
