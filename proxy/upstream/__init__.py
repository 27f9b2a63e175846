"""Talking to registries: the client, credentials, the guarded resolver. Imports core."""
