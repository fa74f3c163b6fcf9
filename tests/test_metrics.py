"""luod's Prometheus endpoint (issue 11, item 3): scraped over HTTP and parsed
with prometheus_client's own parser; every metric of docs/guides/metrics.md is
there, and the values follow a session with a memfd and a failed call."""

from __future__ import annotations

import os
import re
import signal
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import liveupdate
from luodtest import (
    Luod,
    copies_settled,
    luoctl_reboot,
    memfd,
    preserved_session,
    state,
    wait_for,
    wait_until,
)

pytestmark = pytest.mark.luod_only

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "metrics.md"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_report_a_memfd_session_and_a_failed_call(
    luod_factory: Callable[..., Luod],
) -> None:
    port = free_port()
    daemon = luod_factory("--metrics-address", f"127.0.0.1:{port}")

    def answering() -> bool:
        try:
            scrape(port)
        except OSError:
            return False
        return True

    assert wait_until(answering, 20)
    with daemon.open() as dev:
        session = dev.create_session("metered")
        with pytest.raises(liveupdate.NotFoundError):
            dev.retrieve_session("nobody")
    fd = memfd(b"x" * 4096)
    session.preserve(fd, 1)
    samples = scrape(port)
    names = {name for name, _labels in samples}
    documented = set(re.findall(r"^## `(luod_[a-z_]+)`", GUIDE.read_text(), re.M))
    assert documented, "docs/guides/metrics.md documents no metric"
    for metric in documented:
        assert any(n == metric or n.startswith(metric + "_") for n in names), metric
    assert samples[("luod_sessions", (("direction", "outgoing"),))] == 1
    files = {labels: v for (n, labels), v in samples.items() if n == "luod_files"}
    assert len(files) == 1 and sum(files.values()) == 1, files
    ((_direction, (_key, handler)),) = files
    assert "memfd" in handler, files
    assert samples[("luod_memfd_bytes", ())] == 4096
    failed = (("errno", "ENOENT"), ("ioctl", "LIVEUPDATE_IOCTL_RETRIEVE_SESSION"))
    assert samples[("luod_call_failures_total", failed)] == 1
    assert samples[("luod_calls_total", (("ioctl", "LIVEUPDATE_SESSION_PRESERVE_FD"),))] == 1
    assert samples[("luod_generation", ())] == 1
    session.close()
    os.close(fd)


def test_metrics_report_the_live_update_that_started_the_generation(
    luod_factory: Callable[..., Luod],
) -> None:
    """Each generation's reboot histograms hold the live update that started it."""
    port = free_port()
    daemon = luod_factory("--metrics-address", f"127.0.0.1:{port}")
    wait_for(lambda: _scraped(port, 1), "the first generation's metrics", daemon=daemon)
    first = scrape(port)
    assert first[("luod_reboot_blackout_seconds_count", ())] == 0
    assert first[("luod_reboot_duration_seconds_count", ())] == 0
    assert first[("luod_copies", (("kind", "keeper"),))] == 1
    assert first[("luod_copies", (("kind", "off"),))] == 0
    assert first[("luod_copies_error", ())] == 0
    assert first[("luod_recovered_sessions", ())] == first[("luod_recovered_files", ())] == 0
    session = preserved_session(daemon, "kept", b"state")
    luoctl_reboot(daemon)
    wait_for(lambda: _scraped(port, 2), "the second generation's metrics", daemon=daemon)
    after = scrape(port)
    info = state(daemon)
    blackout = after[("luod_reboot_blackout_seconds_sum", ())]
    duration = after[("luod_reboot_duration_seconds_sum", ())]
    assert after[("luod_reboot_blackout_seconds_count", ())] == 1
    assert after[("luod_reboot_duration_seconds_count", ())] == 1
    assert blackout == pytest.approx(info.last_reboot_blackout)
    assert 0 < blackout <= duration
    # One observation: every bucket from the one holding it up counts it, none below.
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (name, labels), value in after.items()
        if name == "luod_reboot_blackout_seconds_bucket"
    )
    assert [v for le, v in buckets] == [1 if blackout <= le else 0 for le, _ in buckets]
    assert after[("luod_generation_start_time_seconds", ())] == pytest.approx(info.started)
    session.close()


def test_metrics_report_what_a_crash_recovery_gave_back(
    luod_factory: Callable[..., Luod],
) -> None:
    port = free_port()
    daemon = luod_factory("--metrics-address", f"127.0.0.1:{port}")
    session = preserved_session(daemon, "kept", b"state")
    with daemon.open() as dev:
        copies_settled(dev)
    daemon.stop(signal.SIGKILL)
    session.close()
    daemon.log = daemon.state_dir / "restarted.log"
    daemon.start()
    wait_for(lambda: _scraped(port, 2), "the recovered generation's metrics", daemon=daemon)
    samples = scrape(port)
    assert samples[("luod_recovered_sessions", ())] == 1
    assert samples[("luod_recovered_files", ())] == 1
    assert samples[("luod_reboot_blackout_seconds_count", ())] == 0


def _scraped(port: int, generation: int) -> bool:
    try:
        return scrape(port).get(("luod_generation", ())) == generation
    except OSError:
        return False
