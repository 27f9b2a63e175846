"""Several processes on one port (``serve --workers N``).

The first process, the primary, is the proxy as it is with one process: it owns the cache
directory, the catalogue and every download, so single-flight across processes is the
single-flight it already has. The other N-1 are front workers: each binds the same port
(``SO_REUSEPORT``: the kernel spreads new connections over the processes), answers the
warm requests it has been told it may answer, and relays everything else to the primary over
a Unix socket in a directory only this user can enter.

What a worker may answer itself, and for how long, the primary says in headers on relayed
answers, only over that socket, and never for longer than :data:`internal.REUSE_MAX`:

* a manifest answer, for the same request (upstream, repository, reference, accepted
  types, credentials), while the tag's answer is fresh;
* a cached blob, for the same repository and credentials: sent from the cache directory's
  own file, which the primary has just opened, size-checked and counted as used.

So a purge, an eviction, a tag's TTL or a login's expiry reaches a worker within a second.
The worker writes the access line of each answer it gives and reports its counts to the
primary every second, so ``/metrics`` and the status page cover every process.
"""
