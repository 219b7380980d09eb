"""keytap: packets and the TLS secrets that decrypt them, in one pcapng file."""

__version__ = "0.1.0"

# The stderr line a capture prints once everything is attached: what wrappers (keytap demo, the
# pytest plugin, the benchmarks, the lab tests) wait for before they start traffic.
READY_LINE = "keytap: capturing on"
