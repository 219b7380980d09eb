"""Merge: one ktime order for packets and keys, TLS flows held until their keys."""
