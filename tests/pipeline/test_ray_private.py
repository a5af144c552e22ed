"""The embedded Ray cluster of ``rlsynth run`` is private: every server listens on loopback only, the GCS
refuses a call without the cluster's token, another cluster on the machine is never attached to, a named
address that does not answer fails in seconds, and no process outlives the cluster.

Sockets and processes are read from /proc (Linux), so the test needs nothing beyond the standard library.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from processes import MARKER, free_port, marked_processes, wait_until_gone

from rlsynth.datasets.errors import RlsynthError
from rlsynth.pipeline.run import (
    PrivateCluster,
    RayTarget,
    check_ray_address,
    ray_session,
    start_private_cluster,
    stop_private_cluster,
)

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads sockets from /proc")

LOOPBACK_IPS = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


# --- /proc helpers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listener:
    pid: int
    ip: str
    port: int

    @property
    def loopback(self) -> bool:
        return self.ip in LOOPBACK_IPS or self.ip.startswith(("127.", "::ffff:127."))


def _ip_from_proc(hexip: str) -> str:
    words = [struct.pack("<I", int(hexip[i : i + 8], 16)) for i in range(0, len(hexip), 8)]
    family = socket.AF_INET if len(hexip) == 8 else socket.AF_INET6
    return socket.inet_ntop(family, b"".join(words))


def _listening_inodes() -> dict[int, tuple[str, int]]:
    found: dict[int, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A":  # TCP_LISTEN
                    hexip, hexport = f[1].split(":")
                    found[int(f[9])] = (_ip_from_proc(hexip), int(hexport, 16))
    return found


def listeners(pids: Iterable[int]) -> list[Listener]:
    """The listening TCP sockets held by ``pids``."""
    inodes = _listening_inodes()
    out = []
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:[") and int(target[8:-1]) in inodes:
                        out.append(Listener(pid, *inodes[int(target[8:-1])]))
    return out


def non_loopback_ipv4() -> list[str]:
    """This machine's IPv4 addresses other than loopback (SIOCGIFADDR on each interface)."""
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):
                req = struct.pack("256s", name.encode()[:15])
                ip = socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, req)[20:24])
                if not ip.startswith("127."):
                    found.append(ip)
    return found


@pytest.fixture
def marker(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A marker in this process's environment (inherited by every cluster process started under it);
    after the test, no marked process may be left."""
    value = uuid.uuid4().hex
    monkeypatch.setenv(MARKER, value)
    yield value
    left = wait_until_gone(value)
    for pid in left:  # clean up before failing, so one failure does not leak into the next test
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes outlived the test: {sorted(left)}"


@pytest.fixture
def cluster(marker: str) -> Iterator[PrivateCluster]:
    c = start_private_cluster(num_cpus=1)
    try:
        yield c
    finally:
        stop_private_cluster(c)


# --- the tests ----------------------------------------------------------------------------------------


def test_every_server_listens_on_loopback_only(cluster: PrivateCluster, marker: str) -> None:
    import ray

    worker = ray.get(ray.remote(lambda: os.getpid()).remote())  # a worker and its gRPC server exist
    pids = marked_processes(marker) | {os.getpid()}
    assert worker in pids
    socks = listeners(pids)
    gcs_port = int(cluster.gcs_address.rsplit(":", 1)[1])
    assert any(s.port == gcs_port for s in socks), socks
    assert {s.pid for s in socks} >= {os.getpid(), worker}  # the driver's and the worker's servers
    assert len({s.pid for s in socks}) >= 4, socks  # GCS, raylet, agents, driver, worker
    exposed = [s for s in socks if not s.loopback]
    assert not exposed, f"listening beyond loopback: {exposed}"
    # And from this machine's other addresses, no port answers at all.
    for ip in non_loopback_ipv4():
        for s in socks:
            with pytest.raises(OSError), socket.create_connection((ip, s.port), timeout=1):
                pass


def test_the_gcs_refuses_a_client_without_the_token(cluster: PrivateCluster) -> None:
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(cluster.gcs_address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        request = gcs_service_pb2.GetAllNodeInfoRequest()
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetAllNodeInfo(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        wrong = [("authorization", "Bearer " + "0" * 64)]
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetAllNodeInfo(request, timeout=10, metadata=wrong)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.GetAllNodeInfo(
            request, timeout=10, metadata=[("authorization", f"Bearer {cluster.token}")]
        )
        assert len(reply.node_info_list) == 1


def test_the_token_is_never_written_and_the_environment_is_restored(marker: str, tmp_path: Path) -> None:
    before = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    home_token = Path.home() / ".ray" / "auth_token"
    had_home_token = home_token.exists()
    c = start_private_cluster(num_cpus=1)
    try:
        assert os.environ["RAY_AUTH_TOKEN"] == c.token and os.environ["RAY_AUTH_MODE"] == "token"
        assert (c.temp_dir.stat().st_mode & 0o077) == 0  # sockets and logs are this user's only
        assert any(c.temp_dir.glob("ray/session_*/sockets/raylet"))
    finally:
        stop_private_cluster(c)
    assert {k: os.environ.get(k) for k in before} == before
    assert home_token.exists() == had_home_token
    assert not c.temp_dir.exists()


def test_another_cluster_on_the_machine_is_not_attached(
    marker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's ``ray start --head`` registers itself as the machine's current cluster, where a plain
    ``ray.init()`` would attach (and then fail on num_cpus). The run's default starts its own."""
    bin_dir = Path(sys.executable).parent
    ray_tmp = Path(tempfile.mkdtemp(prefix="rls-", dir="/tmp"))  # short: Ray's socket paths are limited
    # Ray's default temp dir follows RAY_TMPDIR: the head's ray_current_cluster lands exactly where an
    # unnamed ray.init() in this process would look, without touching the machine's /tmp/ray.
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    head_port = free_port()
    # The test's own head stays on loopback too, and every port it opens is a free one.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}  # fmt: skip
    start = [str(bin_dir / "ray"), "start", "--head", f"--port={head_port}", "--num-cpus=1",
             "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
             f"--temp-dir={ray_tmp / 'ray'}", f"--ray-client-server-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]  # fmt: skip
    try:
        subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
        current = (ray_tmp / "ray" / "ray_current_cluster").read_text().strip()
        assert current.endswith(f":{head_port}")  # the trap is set
        lines: list[str] = []
        with ray_session(RayTarget(None, "default"), lines.append) as ray:
            gcs = ray.get_runtime_context().gcs_address
            assert not gcs.endswith(f":{head_port}")
            assert len(ray.nodes()) == 1 and ray.get(ray.remote(lambda: 6 * 7).remote()) == 42
        assert len(lines) == 1 and lines[0].startswith(f"ray: started a private cluster at {gcs}")
    finally:
        stop_head(marker)
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)


def stop_head(marker: str) -> None:
    """Stop the processes of the test's own head only (``ray stop`` would stop every Ray on the machine,
    other users' included): SIGTERM, then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in marked_processes(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if not wait_until_gone(marker, 10):
            return


def test_a_named_address_that_does_not_answer_fails_in_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(RlsynthError, match=rf"--address 127.0.0.1:{port}: no Ray cluster answers"):
        check_ray_address(f"127.0.0.1:{port}")
    monkeypatch.setenv("RAY_ADDRESS", f"ray://127.0.0.1:{port}")
    with pytest.raises(RlsynthError, match=r"RAY_ADDRESS ray://127\.0\.0\.1"):
        check_ray_address(None)
    assert time.monotonic() - t0 < 10
    with pytest.raises(RlsynthError, match="expected HOST:PORT"):
        check_ray_address("just-a-host")
    monkeypatch.setenv("RAY_ADDRESS", "local")  # Ray's own spelling of "start one here"
    assert check_ray_address(None) == RayTarget(None, "default")
