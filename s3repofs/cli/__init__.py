"""The ``s3repofs`` command line: parsing, one function per subcommand, errors as one line and an exit status."""

from .main import main

__all__ = ["main"]
