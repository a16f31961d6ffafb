"""pyproxymap: a Python re-implementation of Postfix's proxymap(8) lookup-table proxy."""

__version__ = "0.1.0"
