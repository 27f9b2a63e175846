"""What a request means over store, upstream and cluster: single-flight fills, manifests and
tags, cross-repository access. Imports store, upstream, cluster, core.
"""
