"""Load tests: ``python -m loadtests`` runs every scenario and reports ratios against baselines
measured in the same run (see ``loadtests/README.md``).

The parts every scenario shares:

* :mod:`~loadtests.servers`: the servers it starts (ocicache, CNCF distribution as upstream or
  pull-through proxy, nginx, the bare aiohttp handler of :mod:`~loadtests.bare`);
* :mod:`~loadtests.shaper`: the relay that stands for a slow link (shared, or per connection);
* :mod:`~loadtests.loadgen` (wrk, and the sink of :mod:`~loadtests.sink`) and
  :mod:`~loadtests.clients` (aiohttp clients for the cold fan-out): the clients;
* :mod:`~loadtests.sampling` and :mod:`~loadtests.placement`: CPU, memory and other load, and
  which cores servers and clients run on;
* :mod:`~loadtests.fixtures` and :mod:`~loadtests.blobs`: what is served, and how a blob gets
  into every server's cache;
* :mod:`~loadtests.harness`, :mod:`~loadtests.report`, :mod:`~loadtests.chart`: the run, the
  table and the PNG.

The scenarios are :mod:`loadtests.scenarios`; :mod:`~loadtests.fanout` is the cold fan-out's
engine, with a command line of its own for longer runs.
"""
