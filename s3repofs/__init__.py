"""s3repofs: an S3 bucket and a SQL database as a distributed file repository, mountable with FUSE."""

from .config import Config, load_config
from .errors import RepoError
from .repo import RepoFile, S3Repo

__all__ = ["Config", "RepoError", "RepoFile", "S3Repo", "load_config"]
__version__ = "0.1.0"
