"""Pure protocol: names, references, ranges, routing, errors, upstream-auth decisions, settings.
Imports nothing of ours.
"""
