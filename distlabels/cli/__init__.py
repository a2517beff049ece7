"""Command line interface (``distlabels --help``)."""
