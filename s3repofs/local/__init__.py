"""This host's disk: the staging area, the cache of verified objects, downloads into it, and prefetching."""
