"""The cache on disk: content-addressed files, the LRU index and its pins, open descriptors,
verification. Imports core.
"""
