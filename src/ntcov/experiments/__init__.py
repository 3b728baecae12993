"""Runnable experiments behind the ``ntcov`` command line."""
