"""Sinks: the pcapng capture file and the key-log file."""
