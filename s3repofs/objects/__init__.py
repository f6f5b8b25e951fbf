"""Where version bytes live: the object stores (a local directory, S3), the signed S3 fast path, and the one
retry policy for S3."""
