"""The orchestrator core: sessions, files, policy and the live update's steps.

No sockets live here: the core is driven through the dispatcher by a
transport (``luod``), which mirrors how ``kernel/liveupdate/`` is driven by
the ioctls of ``/dev/liveupdate``. One module per concept, one owner per
piece of state: :mod:`.file` (``luo_file.c``: a session's files, what counts
as preserved, the handler interface), :mod:`.session` (``luo_session.c``: the
session set) and :mod:`.session_ops` (its ioctls), :mod:`.policy` (owners,
limits, quotas), :mod:`.luo` (``luo_core.c``: the orchestrator composing
them, the device ioctls), :mod:`.reboot` (the order of a reboot's steps, the
state machine's ioctls) and :mod:`.tables` (the two dispatch tables).
"""
