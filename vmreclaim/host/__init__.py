"""The host daemon (``vmreclaim host``): the back end of the source design, modules 3 and 4.

::

    channel per VM ──► session ──► committer ──► deletion database (SQLite, WAL)
    (transport          (hello,     (group          │ ack only after commit
     driver, VM          records,    commits)        ▼
     from channel)       fences)                 scheduler ── policy.decide
                            ▲                        │
                            └──── fence / trim ◄── reclaimer ── format driver ── punch
                                                     │
                                     status socket, Prometheus, logs ◄── feedback to policy

* :mod:`~vmreclaim.host.daemon` wires it together and runs it (``run_host``);
* :mod:`~vmreclaim.host.session` speaks docs/protocol.md with one agent;
* :mod:`~vmreclaim.host.store` and :mod:`~vmreclaim.host.ingest` make records durable
  before they are acknowledged;
* :mod:`~vmreclaim.host.pending` keeps each disk's pending ranges in memory;
* :mod:`~vmreclaim.host.reclaimer` chooses the safe way to reclaim a disk (fenced host
  punch, guest trim, offline punch) and runs it (DESIGN.md section 4);
* :mod:`~vmreclaim.host.status` and :mod:`~vmreclaim.host.metrics` show what happens.

The host never imports the agent (:mod:`vmreclaim.agent`); what they share is
:mod:`vmreclaim.core.protocol`.
"""
