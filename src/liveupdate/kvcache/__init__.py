"""kvcache: a memcached-compatible cache whose items, listener and clients survive updates.

An application built on the client library (it imports :mod:`liveupdate`'s
client API only). The memcached text protocol (:mod:`.protocol`) over items
that all live in one memfd (:mod:`.arena`: index, LRU lists and slab classes
included, so a new process serves at once), served by one selector loop
(:mod:`.server`).

Command line (console script ``kvcache``, or ``python -m liveupdate.kvcache``)::

    kvcache serve [--listen HOST:PORT] [--memory MIB] [--max-item-size BYTES]
                  [--save-file PATH] [--ready-file PATH] [--inherit-listener]
                  [--session NAME [--device PATH]]
                  [--participant NAME | --no-participant]
    kvcache upgrade NAME [--socket PATH]
    kvcache handoff --pid PID [--ready-file PATH] [--timeout S]

``serve`` under ``luoctl run --session NAME [--keep-on-close]`` keeps the
arena memfd (token 2), the listener (token 1), a connection-state memfd
(token 3) and every client connection (tokens 16 and up) in the session;
``kvcache upgrade NAME`` (= ``luoctl update NAME``, or SIGHUP to ``luoctl
run``) starts the next process first, which takes all of them over once this
one froze; a SIGKILL restarts warm (the arena is rebuilt from its pages
when it was left in use). ``--ready-file`` gets the bound port (atomically)
once serving.

Standalone (no session): ``--save-file PATH`` loads PATH at start when it
exists and saves every item there at SIGTERM; ``--inherit-listener`` takes
the listener from ``LISTEN_FDS=1`` (fd 3). SIGUSR2 to a standalone server
is a listener hand-off: it stops, saves to ``--save-file``, starts ``kvcache
serve`` again with the same options plus ``--inherit-listener`` and the
listener as fd 3, and exits (its connections close); ``kvcache handoff
--pid PID --ready-file PATH`` does that and waits until the successor wrote
PATH. ``--session NAME`` serves straight on a device (``/dev/liveupdate`` or
luod, no ``luoctl run``): the arena is kept in the session NAME, across a
kexec too; SIGUSR1 freezes it for the kexec.
With a session it takes part in luod's live updates as ``kvcache:NAME``
(:mod:`.participant`): writes wait from luod's FREEZE to the update's end.
``KVCACHE_FAULT=kill-in-set:N[:value|link]`` kills the server inside its Nth
store (crash tests). See ``docs/guides/kvcache.md``.
"""
