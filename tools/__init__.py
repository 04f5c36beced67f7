"""SBS operator commands."""
