"""TLS secrets from OpenSSL: discovery, version detection, offsets, uprobes, key log."""
