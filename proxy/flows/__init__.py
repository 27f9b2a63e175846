"""What a request means over store and upstream: single-flight fills, manifests and tags, cross-
repository access. Imports store, upstream, core.
"""
