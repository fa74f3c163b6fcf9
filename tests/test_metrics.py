"""luod's Prometheus endpoint (issue 11, item 3): scraped over HTTP and parsed
with prometheus_client's own parser; every metric of docs/guides/metrics.md is
there, and the values follow a session with a memfd and a failed call."""

from __future__ import annotations

import os
import re
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import liveupdate
from luodtest import Luod, memfd, wait_until

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
