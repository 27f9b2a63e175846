"""Replicas that share state through Redis: the connection and its degraded mode, leases for
single-flight across replicas, shared records and confirmations, and streaming from peers.
Imports core (and store and upstream types).
"""
