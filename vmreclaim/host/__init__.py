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

* :mod:`~vmreclaim.host.daemon` builds the parts, hands each its collaborators, runs
  and stops them (``run_host``);
* :mod:`~vmreclaim.host.registry` follows the hypervisor's VMs, listens on their
  channels and keeps each VM's session;
* :mod:`~vmreclaim.host.session` speaks docs/protocol.md with one agent, asking only
  what :class:`~vmreclaim.host.session.SessionHost` lists, which
  :mod:`~vmreclaim.host.intake` implements;
* :mod:`~vmreclaim.host.store` and :mod:`~vmreclaim.host.ingest` make records durable
  before they are acknowledged; :mod:`~vmreclaim.host.budget` bounds what each VM
  may cost;
* :mod:`~vmreclaim.host.scheduler` owns each disk's state
  (:mod:`~vmreclaim.host.disks`, :mod:`~vmreclaim.host.pending`) and decides when to
  reclaim;
* :mod:`~vmreclaim.host.reclaimer` chooses the safe way to reclaim a disk (fenced host
  punch, guest trim, offline punch) and runs it (DESIGN.md section 4), asking the
  session only what :class:`~vmreclaim.host.reclaimer.AgentLink` lists;
  :mod:`~vmreclaim.host.images` opens images with ``auto`` formats pinned;
* :mod:`~vmreclaim.host.bookkeeping` stores and accounts for each attempt's
  :class:`~vmreclaim.host.attempt.Attempt`;
* :mod:`~vmreclaim.host.status` and :mod:`~vmreclaim.host.metrics` show what happens.

The host never imports the agent (:mod:`vmreclaim.agent`); what they share is
:mod:`vmreclaim.core.protocol`.
"""
