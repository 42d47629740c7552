"""Project-owned extensions mirroring torch namespaces."""
