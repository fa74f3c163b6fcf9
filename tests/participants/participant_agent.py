"""A real participant process for the participant tests.

``python participant_agent.py SOCKET NAME [--prepare ACT] [--freeze ACT]
[--data-at prepare|freeze] [--data HEX] [--follow]``

ACT is ``accept``, ``refuse:ERRNO`` (an errno name), ``slow:SECONDS``
(accepts after that long) or ``crash`` (the process dies while handling
the event, without answering). It registers
through the client library (:class:`liveupdate.Participant`) and prints one
JSON line per thing that happens, flushed, for the test to read:
``registered`` (with the data its name carried, hex), ``event`` (kind,
generation), ``closed`` (luod closed the fd). With ``--follow`` it registers
again with the next generation once the fd closes (the live update) and
answers on until the test ends it.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time

import liveupdate
from liveupdate.client.participant import ParticipantEvent, register_participant


def say(what: str, **fields: object) -> None:
    print(json.dumps({"what": what, **fields}), flush=True)


def register(socket_path: str, name: str, wait: float) -> liveupdate.Participant:
    deadline = time.monotonic() + wait
    while True:
        try:
            with liveupdate.open_device(socket_path, timeout=5.0) as dev:
                part = register_participant(dev, name)
        except liveupdate.LiveUpdateError as exc:
            # The next generation may not serve yet, or the old one still
            # holds the name until it is gone.
            if time.monotonic() > deadline:
                say("register-failed", errno=exc.errno, error=str(exc))
                sys.exit(3)
            time.sleep(0.05)
            continue
        say("registered", pid=os.getpid(), data=part.data.hex())
        return part


def act(spec: str, ev: ParticipantEvent, data: bytes | None) -> bytes | None:
    say("event", kind=ev.kind.name.lower(), generation=ev.generation, seq=ev.seq)
    if spec == "crash":
        os._exit(17)
    if spec.startswith("slow:"):  # answers, but only after this many seconds
        time.sleep(float(spec.split(":", 1)[1]))
    if spec.startswith("refuse:"):
        err = getattr(errno, spec.split(":", 1)[1])
        raise OSError(err, os.strerror(err))
    return data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("socket")
    parser.add_argument("name")
    parser.add_argument("--prepare", default="accept")
    parser.add_argument("--freeze", default="accept")
    parser.add_argument("--data-at", choices=("prepare", "freeze"), default="freeze")
    parser.add_argument("--data", default="")
    parser.add_argument("--follow", action="store_true")
    args = parser.parse_args()
    blob = bytes.fromhex(args.data)
    part = register(args.socket, args.name, 5.0)
    finished = False

    def on_finish(ev: ParticipantEvent) -> None:
        nonlocal finished
        finished = True
        act("accept", ev, None)
        return None

    while True:
        with part:
            part.run(
                on_prepare=lambda ev: act(
                    args.prepare, ev, blob if args.data_at == "prepare" else None
                ),
                on_freeze=lambda ev: act(
                    args.freeze, ev, blob if args.data_at == "freeze" else None
                ),
                on_cancel=lambda ev: act("accept", ev, None),
                on_finish=on_finish,
            )
        say("closed", finished=finished)
        if not args.follow:
            return
        part = register(args.socket, args.name, 30.0)


if __name__ == "__main__":
    main()
