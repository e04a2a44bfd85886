"""Doctest collection of optional backends needs their packages."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("distributed") else ["amortune/backends/dask"]
