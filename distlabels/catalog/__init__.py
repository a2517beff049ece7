"""The label catalog: write fragments, open and query, plot."""
from .query import Catalog, format_table, open_catalog, parse_where
from .writer import result_table, write_catalog_fragment, write_catalog_meta

__all__ = ["Catalog", "format_table", "open_catalog", "parse_where", "result_table", "write_catalog_fragment",
           "write_catalog_meta"]
