"""This host's disk: the staging area, the cache of verified objects and its crash checkpoints, downloads into
it, prefetching, and atomic file writes."""
