"""The orchestrator core: sessions, files, handlers and the handover image.

No sockets live here: the core is driven through the dispatcher by a
transport (``luod``), which mirrors how ``kernel/liveupdate/`` is driven by
the ioctls of ``/dev/liveupdate``.
"""
