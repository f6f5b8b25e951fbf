"""The domain without I/O to servers: repository paths, a version's content, and the lifecycle's rules."""
