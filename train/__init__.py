"""Job entry points: thin wrappers that build a config, call the library, log and checkpoint."""
