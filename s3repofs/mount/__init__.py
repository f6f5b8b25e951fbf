"""The mounted tree: its semantics without FUSE, the FUSE glue, libfuse through ctypes, and the daemon."""
