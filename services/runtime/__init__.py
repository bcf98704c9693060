"""Shared runtime of the clawhub services: bootstrap, settings, errors, channels, names."""
