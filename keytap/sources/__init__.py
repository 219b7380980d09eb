"""Sources: packets from the TC classifier, TLS keys from the uprobes, markers from a socket."""
