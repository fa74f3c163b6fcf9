#!/usr/bin/env python3
"""Benchmark: the blackout participants see across a live update of luod.

N participants (0, 1, 8, 32) register with luod, each in a thread of this
process through the client library (``liveupdate.register_participant``),
and carry 8 bytes across ``REBOOT`` (after a PREPARE, as ``luoctl reboot``
does). A participant's blackout runs from the moment it receives FREEZE to
the moment it is registered again with the next generation and holds its
data back: then it may resume. The table gives the blackout of the last
participant to come back (FREEZE of the first to last one back, the
participants' blackout), next to luod's own blackout as the next generation
reports it (``GET_STATE.last_reboot_blackout_ns``: from its freeze to serving),
so that what participants add is visible. One session with one memfd is
preserved throughout. Clocks: ``CLOCK_MONOTONIC``, one process.

    .venv/bin/python bench/participants.py            # full run (about a minute)
    .venv/bin/python bench/participants.py --quick    # tiny sizes, a smoke run
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import resultfile
from luodproc import start_luod

import liveupdate
from liveupdate import uapi
from liveupdate.client.control import control_path, open_control

#: What each participant carries across (the v2 series' u64).
DATA = (0x1122334455667788).to_bytes(8, "little")


class Timed:
    """One participant thread: registers, answers, registers again after the update."""

    def __init__(self, device: str, name: str) -> None:
        self.device = device
        path = control_path(device)
        assert path is not None
        self.control = path
        self.name = name
        self.frozen_at = 0.0
        self.back_at = 0.0
        self.error = ""
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._live, daemon=True)
        self.thread.start()

    def _register(self, generation: int) -> liveupdate.Participant:
        deadline = time.monotonic() + 30
        while True:
            try:
                # The control socket, never busy (the device admits one opener).
                with open_control(self.control, timeout=10.0) as control:
                    # A connection the old generation accepted dies with it.
                    if control.get_state().generation >= generation:
                        return control.register_participant(self.name)
            except liveupdate.LiveUpdateError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.0005)

    def _live(self) -> None:
        try:
            with self._register(1) as part:
                self.ready.set()

                def on_freeze(_ev: liveupdate.ParticipantEvent) -> bytes:
                    self.frozen_at = time.monotonic()
                    return DATA

                part.run(on_freeze=on_freeze)
            again = self._register(2)
            self.back_at = time.monotonic()
            if again.data != DATA:
                self.error = f"data came back as {again.data!r}"
            again.close()
        except Exception as exc:  # reported by the main thread
            self.error = repr(exc)
            self.ready.set()


def one_run(count: int) -> tuple[float, float]:
    """One live update with ``count`` participants: (participants' blackout,
    luod's blackout), in milliseconds."""
    state = Path(tempfile.mkdtemp(prefix="bench-participants-"))
    proc = start_luod(state)
    device = str(state / "device")
    try:
        with liveupdate.open_device(device, timeout=10.0) as dev:
            session = dev.create_session("kept")
        fd = os.memfd_create("bench", os.MFD_CLOEXEC)
        os.write(fd, b"x" * 4096)
        session.preserve(fd, 1)
        os.close(fd)
        parts = [Timed(device, f"p{i}") for i in range(count)]
        for part in parts:
            part.ready.wait(30)
            if part.error:
                raise RuntimeError(part.error)
        with liveupdate.open_device(device, timeout=10.0) as dev:
            dev.set_event(uapi.LuodEvent.PREPARE)
            started = time.monotonic()
            dev.set_event(uapi.LuodEvent.REBOOT)
        for part in parts:
            part.thread.join(60)
            if part.error or not part.back_at:
                raise RuntimeError(part.error or f"{part.name} did not come back")
        deadline = time.monotonic() + 30
        while True:
            try:
                with liveupdate.open_device(device, timeout=10.0) as dev:
                    info = dev.get_state()
                if info.generation == 2:
                    break
            except liveupdate.LiveUpdateError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("generation 2 did not serve")
            time.sleep(0.001)
        first = min((p.frozen_at for p in parts), default=started)
        last = max((p.back_at for p in parts), default=first)
        session.close()
        return (last - first) * 1e3, info.last_reboot_blackout * 1e3
    finally:
        serving = int((state / "luod.lock").read_text().strip() or 0)
        for pid in {proc.pid, serving} - {0}:
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass
        proc.wait(30)
        deadline = time.monotonic() + 10
        while serving and time.monotonic() < deadline:
            try:
                os.kill(serving, 0)
            except ProcessLookupError:
                break
            time.sleep(0.01)
        shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", help="result file (default bench/results/participants.json)")
    parser.add_argument("--plots", default=None, help="directory for the plot")
    args = parser.parse_args()
    counts = [0, 1, 4] if args.quick else [0, 1, 8, 32]
    repeat = 1 if args.quick else args.repeat
    machine = resultfile.machine()
    medians: dict[int, tuple[float, float]] = {}
    for count in counts:
        runs = [one_run(count) for _ in range(repeat)]
        theirs = statistics.median(r[0] for r in runs)
        luods = statistics.median(r[1] for r in runs)
        medians[count] = (theirs, luods)
        print(f"{count:3d} participants: theirs {theirs:7.1f} ms, luod's {luods:7.1f} ms")
    # The floor: luod's own blackout with no participant, in the same run.
    floor = medians[0][1]
    rows: list[resultfile.Row] = []
    for count in counts:
        theirs, luods = medians[count]
        rows.append(
            [
                count,
                "-" if count == 0 else round(theirs, 1),
                round(luods, 1),
                f"{luods / floor:.2f}x",
                "-" if count == 0 else f"{theirs / floor:.2f}x",
                repeat,
            ]
        )
    top = counts[-1]
    luod_ratio = medians[top][1] / floor
    their_ratio = medians[top][0] / floor
    goals = [
        resultfile.goal(
            f"with {top} participants, luod's blackout is at most 2x its blackout without any",
            f"{luod_ratio:.2f}x ({floor:.1f} -> {medians[top][1]:.1f} ms)",
            luod_ratio <= 2,
            "their FREEZE is sent to all at once and answered in parallel",
        ),
        resultfile.goal(
            f"the last of {top} participants is back within 4x luod's blackout without any",
            f"{their_ratio:.2f}x ({medians[top][0]:.1f} ms)",
            their_ratio <= 4,
            "each comes back as soon as it can register with the next generation "
            "(through the control socket, never busy)",
        ),
    ]
    tables = [
        resultfile.table(
            "Blackout across one live update (median, ms): participants' is from the "
            "first FREEZE received to the last participant registered again with its "
            "data (each registers through the control socket); luod's is "
            "GET_STATE.last_reboot_blackout_ns of the next generation; ratios against "
            "the floor, luod's blackout with no participant in the same run",
            [
                "participants",
                "participants' blackout",
                "luod's blackout",
                "luod's / floor",
                "participants' / floor",
                "runs",
            ],
            rows,
        )
    ]
    results_dir, stem, plots_dir = resultfile.destination(
        args.quick, args.out, args.plots, "participants"
    )
    png = plots_dir / "participants.png"
    plot(medians, png)
    resultfile.write(results_dir, stem, TITLE, machine, tables, goals, [png])


def plot(medians: dict[int, tuple[float, float]], path: Path) -> None:
    """Both blackouts against the number of participants, with the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted(medians)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(counts, [medians[c][1] for c in counts], "o-", label="luod's blackout")
    with_some = [c for c in counts if c > 0]
    ax.plot(with_some, [medians[c][0] for c in with_some], "s-", label="participants' blackout")
    ax.axhline(medians[0][1], color="gray", linestyle=":", label="floor: luod's, no participant")
    ax.set_xlabel("participants")
    ax.set_ylabel("ms (median)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


TITLE = "Participants: the blackout they see"

if __name__ == "__main__":
    main()
