"""The command line: serve, verify, and logging set-up. Imports everything below."""
