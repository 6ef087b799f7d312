"""EmbeddedBroker: a local MQTT broker for development, tests and ``meshdl mesh up``.

mosquitto (``mosquitto -c conf``) on a free 127.0.0.1 port with a config from
``broker/`` (installed as ``meshdl.broker_conf``): ``plain``, ``auth``, ``tls``,
``bridge``, or a path to your own template. Placeholders ``@NAME@`` are
substituted (PORT, HOST, DIR, MAX_PACKET_SIZE, MAX_QUEUED, USER_LINE and any you
pass). Without the mosquitto binary (or with ``MESHDL_MOSQUITTO=none``), the ``plain``
and ``auth`` configs fall back to amqtt running in-process (MQTT 3.1.1 only, slower;
``auth`` checks user names and passwords but has no ACL there), quietly.

mosquitto started as root drops to the ``mosquitto`` user unless the config says
``user root``; the built-in configs say ``user mosquitto`` when that user exists (never
forcing root), and the work dir (0700) and its files (0600: password hashes, keys)
are handed to it. When not root, the dir is 0700 and the files 0600 too; a custom
template run as root without a ``user`` line gets a world-readable dir so the dropped
user can read it.
mosquitto runs in its own session (the terminal's Ctrl-C reaches only meshdl, which
stops it in order); a ``reaper`` (``meshdl.node.reaper.Reaper``) also kills it and
removes the work dir if this process dies without stopping it.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Mapping

from meshdl.data import data_dir
from meshdl.errors import TransportError
from meshdl.transport.amqtt_broker import AmqttThread
from meshdl.transport.passwords import make_password_file

log = logging.getLogger(__name__)

BUILTIN_CONFIGS = ("plain", "auth", "tls", "bridge")
DEFAULT_MAX_PACKET = 80 << 20
DEFAULT_MAX_QUEUED = 10000
_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


MOSQUITTO_ENV = "MESHDL_MOSQUITTO"
_HIDDEN = ("none", "off", "0", "no", "false")


def mosquitto_binary() -> str | None:
    """The mosquitto binary: ``$MESHDL_MOSQUITTO`` when set (a path; ``none`` hides
    mosquitto, as on a machine without it), else PATH, /usr/sbin, /usr/local/sbin."""
    override = os.environ.get(MOSQUITTO_ENV)
    if override is not None and override.strip():
        if override.strip().lower() in _HIDDEN:
            return None
        if os.access(override, os.X_OK):
            return override
        raise TransportError(f"{MOSQUITTO_ENV}={override} is not an executable; point it "
                             "at the mosquitto binary, or set it to 'none' to use amqtt")
    found = shutil.which("mosquitto")
    if found:
        return found
    for cand in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(cand, os.X_OK):
            return cand
    return None


def _user_line() -> str:
    """As root: run mosquitto as its own ``mosquitto`` user when it exists (never force
    root); otherwise mosquitto keeps our user."""
    if os.geteuid() != 0:
        return ""
    import pwd
    try:
        pwd.getpwnam("mosquitto")
        return "user mosquitto"
    except KeyError:
        return "user root"


def _dropped_to(config: str) -> tuple[int, int] | None:
    """(uid, gid) mosquitto drops to when started as root with ``user NAME`` (not root)."""
    m = re.search(r"(?m)^\s*user\s+(\S+)\s*$", config)
    if os.geteuid() != 0 or m is None or m.group(1) == "root":
        return None
    import pwd
    try:
        pw = pwd.getpwnam(m.group(1))
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


def _traversable(path: Path, uid: int) -> bool:
    """Can ``uid`` reach ``path`` (execute permission on every ancestor)?"""
    for parent in Path(path).resolve().parents:
        st = parent.stat()
        if not (st.st_mode & 0o001 or (st.st_uid == uid and st.st_mode & 0o100)):
            return False
    return True


class EmbeddedBroker:
    """Start/stop a broker. Use as a context manager; ``url`` is where to connect.

    ``config``: None or one of BUILTIN_CONFIGS, or a path to a template.
    ``files``: extra files copied into the work dir (name -> source path or bytes),
    e.g. certificates. ``users``: for ``auth`` and ``bridge``, name -> password (hashed into
    ``@DIR@/passwords``). ``backend``: "auto", "mosquitto" or "amqtt".
    ``tls`` needs client certificates (CN = user name), ``bridge`` users (no
    anonymous clients in either). ``workdir``: where the config, log and files go (default: a fresh temp dir,
    removed on stop).
    """

    def __init__(self, config: str | os.PathLike | None = None, *, host: str = "127.0.0.1",
                 port: int | None = None, substitutions: Mapping[str, object] | None = None,
                 files: Mapping[str, object] | None = None,
                 users: Mapping[str, str] | None = None, backend: str = "auto",
                 max_packet_size: int = DEFAULT_MAX_PACKET,
                 max_queued: int = DEFAULT_MAX_QUEUED, startup_timeout: float = 10.0,
                 workdir: str | os.PathLike | None = None, reaper=None) -> None:
        if backend not in ("auto", "mosquitto", "amqtt"):
            raise TransportError(f"unknown broker backend {backend!r}; use auto, mosquitto "
                                 "or amqtt")
        self.host = host
        self.port = port
        self._config = config
        self._subs = dict(substitutions or {})
        self._files = dict(files or {})
        self._users = dict(users or {})
        self._backend = backend
        self._max_packet = max_packet_size
        self._max_queued = max_queued
        self._timeout = startup_timeout
        self._proc: subprocess.Popen | None = None
        self._amqtt: AmqttThread | None = None
        self._dir: Path | None = None
        self._own_dir = workdir is None
        if workdir is not None:
            self._dir = Path(workdir)
            self._dir.mkdir(parents=True, exist_ok=True)
        self.kind: str | None = None       # "mosquitto" or "amqtt" once started
        self._reaper = reaper

    # ----------------------------------------------------------- properties
    @property
    def url(self) -> str:
        if self.port is None:
            raise TransportError("broker not started; call start() or use it as a "
                                 "context manager")
        scheme = "mqtts" if self._config_name() == "tls" else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def workdir(self) -> Path:
        if self._dir is None:
            raise TransportError("broker not started")
        return self._dir

    @property
    def running(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self._amqtt is not None

    def log_tail(self, lines: int = 20) -> str:
        if self._dir is None or not (self._dir / "broker.log").exists():
            return ""
        text = (self._dir / "broker.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    # ----------------------------------------------------------- lifecycle
    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "EmbeddedBroker":
        if self.running:
            return self
        binary = mosquitto_binary()
        use_mosquitto = self._backend == "mosquitto" or (self._backend == "auto" and binary)
        if use_mosquitto and not binary:
            raise TransportError("mosquitto is not installed; install it (apt-get install "
                                 "mosquitto) or use backend='amqtt'")
        if self.port is None:
            self.port = free_port(self.host)
        if use_mosquitto:
            self._start_mosquitto(binary)
        else:
            if self._config_name() not in (None, "plain", "auth"):
                raise TransportError(f"the amqtt fallback only serves the plain and auth "
                                     f"configs, not {self._config!r}; install mosquitto")
            users = self._users if self._config_name() == "auth" else None
            if self._config_name() == "auth" and not users:
                raise TransportError("an auth broker needs at least one user; pass "
                                     "users={'name': 'password'}")
            self._amqtt = AmqttThread(self.host, self.port, users=users)
            self._amqtt.start(self._timeout)
            self.kind = "amqtt"
        log.info("%s broker listening on %s", self.kind, self.url)
        return self

    def restart(self) -> "EmbeddedBroker":
        """Stop and start again on the same port (clients should reconnect)."""
        self.stop(cleanup=False)
        return self.start()

    def stop(self, cleanup: bool = True) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc is not None and self._reaper is not None:
            self._reaper.forget(proc.pid)
        amqtt, self._amqtt = self._amqtt, None
        if amqtt is not None:
            amqtt.stop()
        if cleanup and self._dir is not None and self._own_dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def kill(self) -> None:
        """SIGKILL the mosquitto process (tests of abrupt broker loss)."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(5)
            self._proc = None

    # ----------------------------------------------------------- mosquitto
    def _config_name(self) -> str | None:
        c = self._config
        return c if c is None or c in BUILTIN_CONFIGS else None

    def _template(self) -> str:
        name = self._config or "plain"
        path = data_dir("broker") / f"{name}.conf" if name in BUILTIN_CONFIGS else Path(name)
        try:
            return path.read_text()
        except OSError as exc:
            raise TransportError(f"cannot read broker config template {path}: {exc}; pass "
                                 f"one of {BUILTIN_CONFIGS} or an existing file") from exc

    def _prepare_dir(self, private: bool) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="meshdl-broker-"))
            if self._reaper is not None:
                self._reaper.add_dir(self._dir)
        d = self._dir
        os.chmod(d, 0o700 if private else 0o755)
        files = dict(self._files)
        if self._config in ("auth", "bridge", "tls"):
            files.setdefault("meshdl.acl", data_dir("broker") / "meshdl.acl")
        if self._config in ("auth", "bridge") and "passwords" not in files:
            if not self._users:
                raise TransportError(f"the {self._config} broker config admits no anonymous "
                                     "clients; pass users={'name': 'password'} (or "
                                     "files={'passwords': FILE})")
            make_password_file(d / "passwords", self._users)
        for name, src in files.items():
            dst = d / name
            if isinstance(src, (bytes, bytearray)):
                dst.write_bytes(src)
            elif Path(src).resolve() != dst.resolve():
                shutil.copyfile(src, dst)
        for f in d.iterdir():
            os.chmod(f, 0o600 if private else 0o644)
        return d

    def _render(self, d: Path) -> str:
        values = {"PORT": self.port, "HOST": self.host, "DIR": d,
                  "MAX_PACKET_SIZE": self._max_packet, "MAX_QUEUED": self._max_queued,
                  "USER_LINE": _user_line(),
                  "REMOTE_HOST": "127.0.0.1"}
        values.update(self._subs)

        def sub(m: re.Match) -> str:
            if m.group(1) not in values:
                raise TransportError(f"broker config needs @{m.group(1)}@; pass "
                                     f"substitutions={{'{m.group(1)}': ...}}")
            return str(values[m.group(1)])
        return _PLACEHOLDER.sub(sub, self._template())

    def _start_mosquitto(self, binary: str) -> None:
        # rendering reads the template only; @DIR@ is known before the dir's mode is set
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="meshdl-broker-"))
            if self._reaper is not None:
                self._reaper.add_dir(self._dir)
        text = self._render(self._dir)
        owner = _dropped_to(text)          # root -> the mosquitto user: hand it the files
        if owner is not None and not _traversable(self._dir, owner[0]):
            log.info("mosquitto keeps root rights: its work dir %s sits under a directory "
                     "the mosquitto user cannot enter", self._dir)
            text, owner = re.sub(r"(?m)^\s*user\s+\S+\s*$", "user root", text), None
        private = os.geteuid() != 0 or owner is not None or \
            re.search(r"(?m)^\s*user\s+root\s*$", text) is not None
        d = self._prepare_dir(private)
        conf = d / "mosquitto.conf"
        conf.write_text(text)
        os.chmod(conf, 0o600 if private else 0o644)
        fd = os.open(d / "broker.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                     0o600 if private else 0o644)
        if owner is not None:
            for f in [d, *d.iterdir()]:
                os.chown(f, owner[0], owner[1])
        with open(fd, "ab") as logf:
            self._proc = subprocess.Popen([binary, "-c", str(conf)], stdout=logf,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True)
        if self._reaper is not None:
            self._reaper.add_process(self._proc.pid, group=True)
        self.kind = "mosquitto"
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self._proc = None
                raise TransportError(f"mosquitto exited with code {rc} on port {self.port}; "
                                     f"log tail:\n{self.log_tail()}")
            if port_open(self.host, self.port):
                return
            time.sleep(0.02)
        self.stop(cleanup=False)
        raise TransportError(f"mosquitto did not listen on {self.host}:{self.port} within "
                             f"{self._timeout} s; log tail:\n{self.log_tail()}")
