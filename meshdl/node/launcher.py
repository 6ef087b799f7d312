"""MeshUp: a local emulated mesh: a broker plus one node process per device.

    with MeshUp("home-4", model="tiny_cnn") as up:      # start() + stop()
        snap = up.wait_ready(60)                        # members, leader, plan agreed
        up.kill("pi4-a")                                # SIGKILL, for fault injection
        print(up.url, up.log_path("nano"))

Each node is ``sys.executable -m meshdl.cli node start --emulate --topology T --id D``,
logging to ``log_dir/D.log``. A topology given as a ``Mesh`` object is written to
``log_dir/topology.yaml`` first. ``stop()`` terminates the nodes (they leave cleanly),
kills stragglers, then stops the embedded broker.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

from meshdl.errors import MeshdlError
from meshdl.mesh import Mesh, dump_topology, load_topology
from meshdl.node.config import DEFAULT_MESH
from meshdl.node.status import MeshWatcher, Snapshot

log = logging.getLogger(__name__)


class LaunchError(MeshdlError):
    """The local mesh did not come up (a node died, or a deadline passed)."""


class MeshUp:
    def __init__(self, topology: str | Path | Mesh, *, broker: str | None = None,
                 mesh: str = DEFAULT_MESH, model: str | None = None,
                 models: Sequence[str] = (), backend: str = "auto",
                 protocol: str | None = None, log_dir: str | Path | None = None,
                 devices: Sequence[str] | None = None, dataplane: bool = True,
                 node_args: Sequence[str] = (), username: str | None = None,
                 password: str | None = None, telemetry_period: float | None = None,
                 verbose: bool = True, env: dict | None = None,
                 bundles: Mapping[str, str | Path] | None = None,
                 watch_bundle: str | Path | None = None, credentials: bool = False,
                 supervise: bool = False, stop_timeout: float = 10.0) -> None:
        self.mesh_obj = load_topology(topology)
        self._topology_arg = topology if not isinstance(topology, Mesh) else None
        self.mesh_name = mesh
        self.models = list(models) or ([model] if model else [])
        self._broker_url = broker
        self._backend = backend
        self.protocol = protocol or ("3.1.1" if backend == "amqtt" else "auto")
        self._own_logs = log_dir is None
        self._log_dir = Path(log_dir) if log_dir is not None else None   # made on first use
        self.devices = list(devices) if devices is not None else sorted(self.mesh_obj.devices)
        self._dataplane = dataplane
        self._node_args = list(node_args)
        self._username, self._password = username, password
        # credentials=True: the embedded broker gets a random user and password (also on
        # loopback: another local user must not read or inject mesh traffic)
        self._credentials = credentials and broker is None
        # supervise=True: a Reaper process removes everything if this process dies, and
        # the nodes watch for their parent's death themselves
        self._supervise = supervise
        self._reaper = None
        self._child_tmp: Path | None = None
        self._stop_timeout = stop_timeout
        self._telemetry = telemetry_period
        self._verbose = verbose
        self._env = env
        self.broker = None
        self.procs: dict[str, subprocess.Popen] = {}
        self._watch_bus = None
        self.watcher: MeshWatcher | None = None
        # secure mesh (meshdl.security): one bundle per device, one for the watcher
        self._bundles = {k: str(v) for k, v in (bundles or {}).items()}
        self._watch_bundle = str(watch_bundle) if watch_bundle else None

    # ------------------------------------------------------------ lifecycle
    @property
    def log_dir(self) -> Path:
        """The nodes' logs: the caller's dir, or a temp dir made on first use (so a
        launcher that is never started leaves nothing behind) and removed by stop()."""
        if self._log_dir is None:
            self._log_dir = Path(tempfile.mkdtemp(prefix="meshdl-mesh-"))
        return self._log_dir

    @property
    def url(self) -> str:
        if self._broker_url is not None:
            return self._broker_url
        if self.broker is None:
            raise LaunchError("mesh not started; call start() first")
        return self.broker.url

    @property
    def username(self) -> str | None:
        return self._username

    @property
    def password(self) -> str | None:
        return self._password

    def __enter__(self) -> "MeshUp":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "MeshUp":
        if self._supervise and self._reaper is None:
            from meshdl.node.reaper import Reaper
            self._reaper = Reaper().start()
            if self._own_logs and os.environ.get("MESHDL_KEEP_LOGS") is None:
                self._reaper.add_dir(self.log_dir)
            # the nodes' own temp files (e.g. TLS material from a bundle) go in a dir of
            # ours: removed even when a node is killed before it could clean up
            self._child_tmp = Path(tempfile.mkdtemp(prefix="meshdl-nodes-tmp-"))
            self._reaper.add_dir(self._child_tmp)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self._topology_arg is None or not _is_file_or_name(self._topology_arg):
            path = self.log_dir / "topology.yaml"
            path.write_text(dump_topology(self.mesh_obj))
            self._topology_path = str(path)
        else:
            self._topology_path = str(self._topology_arg)
        try:
            if self._broker_url is None:
                from meshdl.transport.broker import EmbeddedBroker
                users = None
                if self._credentials:
                    import secrets
                    self._username = f"meshdl-{secrets.token_hex(4)}"
                    self._password = secrets.token_urlsafe(24)
                    users = {self._username: self._password}
                self.broker = EmbeddedBroker("auth" if users else None, users=users,
                                             backend=self._backend,
                                             reaper=self._reaper).start()
                if self.broker.kind == "amqtt":
                    self.protocol = "3.1.1"
            from meshdl.transport.paho_bus import PahoBus
            if self._watch_bundle:
                from meshdl.security.securebus import secure_paho
                self._watch_bus = secure_paho(self.url, self._watch_bundle, mesh=self.mesh_name,
                                              protocol=self.protocol or "auto")
            else:
                self._watch_bus = PahoBus(self.url, username=self._username,
                                          password=self._password,
                                          protocol=self.protocol if self.protocol else "auto")
            self.watcher = MeshWatcher(self._watch_bus, self.mesh_name)
            for dev in self.devices:
                self.spawn(dev)
        except BaseException:
            self.stop()
            raise
        return self

    def node_command(self, device: str) -> list[str]:
        cmd = [sys.executable, "-m", "meshdl.cli"] + (["-v"] if self._verbose else []) + [
            "node", "start", "--broker", self.url, "--mesh", self.mesh_name, "--id", device,
            "--emulate", "--topology", self._topology_path]
        if self.models:
            cmd += ["--models", ",".join(self.models)]
        if self.protocol and self.protocol != "auto":
            cmd += ["--protocol", self.protocol]
        if self._username:
            cmd += ["--username", self._username]
        if device in self._bundles:
            cmd += ["--bundle", self._bundles[device]]
        if self._telemetry is not None:
            cmd += ["--telemetry-period", str(self._telemetry)]
        if not self._dataplane:
            cmd.append("--no-dataplane")
        return cmd + self._node_args

    def spawn(self, device: str) -> subprocess.Popen:
        """Start (or restart) the node process of ``device``."""
        old = self.procs.get(device)
        if old is not None and old.poll() is None:
            raise LaunchError(f"node {device} is already running (pid {old.pid})")
        env = dict(os.environ if self._env is None else self._env)
        if self._supervise:
            from meshdl.node.reaper import child_env
            env = child_env(env)
            if self._child_tmp is not None:
                env["TMPDIR"] = str(self._child_tmp)
        if self._password:
            env["MESHDL_PASSWORD"] = self._password
        with open(self.log_path(device), "ab") as logf:
            p = subprocess.Popen(self.node_command(device), stdout=logf,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                 start_new_session=True)
        self.procs[device] = p
        if self._reaper is not None:
            self._reaper.add_process(p.pid, group=True)
        return p

    def log_path(self, device: str) -> Path:
        return self.log_dir / f"{device}.log"

    def kill(self, device: str) -> None:
        """SIGKILL one node (its will marks it offline)."""
        p = self.procs[device]
        if p.poll() is None:
            p.kill()
            p.wait(5)

    def terminate(self, device: str, timeout: float = 10.0) -> int:
        """SIGTERM one node and wait for its clean exit."""
        p = self.procs[device]
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                return p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                return p.wait(5)
        return p.returncode

    def alive(self) -> list[str]:
        return sorted(d for d, p in self.procs.items() if p.poll() is None)

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM the nodes (they leave cleanly), SIGKILL any still there after
        ``timeout`` (default: the constructor's ``stop_timeout``), stop the broker,
        remove the temp dirs."""
        timeout = self._stop_timeout if timeout is None else timeout
        procs = [p for p in self.procs.values() if p.poll() is None]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.02)
        stuck = [p for p in procs if p.poll() is None]
        if stuck:
            log.info("node pid(s) %s did not leave in %.1f s; killing them",
                     ", ".join(str(p.pid) for p in stuck), timeout)
        for p in stuck:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                p.kill()
        for p in stuck:
            p.wait(5)
        log.debug("nodes stopped")
        if self._watch_bus is not None:
            self._watch_bus.close()
            self._watch_bus = None
        log.debug("watch bus closed")
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        log.debug("broker stopped")
        if self._own_logs and self._log_dir is not None and \
                os.environ.get("MESHDL_KEEP_LOGS") is None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
        if self._child_tmp is not None:
            shutil.rmtree(self._child_tmp, ignore_errors=True)
            self._child_tmp = None
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            for p in self.procs.values():
                reaper.forget(p.pid)
            reaper.close()
            log.debug("reaper closed")

    # ------------------------------------------------------------ readiness
    def wait_for(self, pred, timeout: float, what: str = "condition") -> Snapshot:
        """Wait for ``pred(snapshot)``; raise LaunchError (with log tails) on timeout or
        when a node process dies meanwhile."""
        if self.watcher is None:
            raise LaunchError("mesh not started; call start() first")
        deadline = time.monotonic() + timeout
        expected = set(self.procs)
        while True:
            snap = self.watcher.wait_for(pred, min(0.5, max(0.0, deadline - time.monotonic())))
            if snap is not None:
                return snap
            dead = [d for d in expected if self.procs[d].poll() not in (None, -9, -15)]
            if dead:
                raise LaunchError(f"node(s) {', '.join(sorted(dead))} exited while waiting for "
                                  f"{what}:\n{self.tails(dead)}")
            if time.monotonic() >= deadline:
                raise LaunchError(f"timed out after {timeout:g} s waiting for {what}; "
                                  f"online: {self.watcher.snapshot().online}\n"
                                  f"{self.tails(sorted(expected), 8)}")

    def wait_ready(self, timeout: float = 60.0, need_plan: bool = True) -> Snapshot:
        """Every launched node online, a leader, and (need_plan) every node holding the
        leader's current plan(s)."""
        devices = self.alive()
        return self.wait_for(lambda s: all(d in s.online for d in devices) and
                             s.agreed(devices, need_plan=need_plan), timeout,
                             f"{len(devices)} members, a leader"
                             + (" and an agreed plan" if need_plan else ""))

    def tails(self, devices: Sequence[str], lines: int = 15) -> str:
        out = []
        for d in devices:
            try:
                text = self.log_path(d).read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                text = ["(no log)"]
            out.append(f"--- {d} ---\n" + "\n".join(text))
        return "\n".join(out)


def _is_file_or_name(arg: object) -> bool:
    return isinstance(arg, (str, Path))
