"""Where version bytes live: the object stores (a local directory, S3) and the signed S3 fast path."""
