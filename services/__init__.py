"""clawhub services: one folder per service plus the shared runtime package."""
