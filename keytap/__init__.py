"""keytap: packets and the TLS secrets that decrypt them, in one pcapng file."""

__version__ = "0.1.0"
