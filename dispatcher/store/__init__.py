"""What outlives the process: the journal and the caches."""
