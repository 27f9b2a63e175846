"""The air gap: prefetch, export, import, and the cache's images on the command line.

Built on :mod:`proxy.flows` (an :class:`~proxy.flows.engine.Engine` fetches, verifies and commits
exactly as a pull through the proxy does) and :mod:`proxy.store`; never on :mod:`proxy.web`.
"""
