"""Worker mode (contract section 12): one gateway on every core of the machine.

With ``[server] workers = N`` (N > 1) the ``twistd nexus`` process supervises:
it opens the listening socket and starts N worker processes that accept on it
(the kernel spreads the connections). The fleet stays in the supervisor: one
health poller and one mDNS browser, whose backend states are sent to every
worker, so all of them route on the same states.

One exact view: each worker records its own requests as a single process does,
and sends every finished record (batched per reactor turn) through the
supervisor to every other worker, which records it too. Every process so holds
the whole gateway's counters, history and charts; a worker that dies takes
none of them away. A read (``/metrics``, ``/v1/stats``, ``/v1/history``,
``/health``, the page) first syncs: the supervisor asks every other worker to
send what it has not sent and to report its requests in flight, and answers
once all of that was forwarded; the channels keep order, so the read then
includes every request finished anywhere before it began.

- :mod:`~nexus.workers.channel`: the AMP commands and what they carry;
- :mod:`~nexus.workers.supervisor`: the socket, the processes, the forwarding;
- :mod:`~nexus.workers.worker`: a worker process (``python -m nexus.workers.worker``).
"""
