"""SBS node: the engine of a hot-standby pair."""
