"""``python -m proxy.workers``: a front worker process (started by ``serve --workers``)."""

from proxy.workers.process import main

main()
