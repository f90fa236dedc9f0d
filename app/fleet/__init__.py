"""The fleet: the backends behind the queue, read from BACKENDS_FILE (or the settings, for a fleet of one)."""
