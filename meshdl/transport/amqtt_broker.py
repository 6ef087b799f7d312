"""amqtt (pure-Python, MQTT 3.1.1) broker in a background thread with its own loop.

The fallback when mosquitto is not installed. amqtt 0.12: ``Broker(config, loop)``
must be built inside the running loop; ``await start()`` / ``await shutdown()``.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from meshdl.errors import TransportError

log = logging.getLogger(__name__)


QUIET_LOGGERS = ("amqtt", "transitions")


class AmqttThread:
    """``users``: name -> password; when given, only those may connect."""

    def __init__(self, host: str, port: int, users: dict[str, str] | None = None) -> None:
        self.host, self.port = host, port
        self._users = dict(users or {})
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _config(self) -> dict[str, Any]:
        if self._users:
            from meshdl.transport.passwords import hash_password
            auth = {"meshdl.transport.amqtt_auth.PasswordAuth":
                    {"users": {n: hash_password(p) for n, p in self._users.items()}}}
        else:
            auth = {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                    {"allow_anonymous": True}}
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}",
                                      "max_connections": 0}},
            "plugins": auth,
        }

    def start(self, timeout: float = 10.0) -> None:
        try:
            from amqtt.broker import Broker  # noqa: F401 (a dependency of meshdl)
        except ImportError as exc:
            raise TransportError("neither mosquitto nor amqtt is installed; reinstall meshdl "
                                 "(pip install -e .: amqtt is a dependency) or install "
                                 "mosquitto (apt-get install mosquitto)") from exc
        # amqtt logs every connection and plugin detail at INFO/WARNING: keep meshdl's
        # output clean unless meshdl itself is at debug level
        if not logging.getLogger("meshdl").isEnabledFor(logging.DEBUG):
            for name in QUIET_LOGGERS:
                logging.getLogger(name).setLevel(logging.ERROR)
        self._thread = threading.Thread(target=self._run, name="meshdl-amqtt", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise TransportError(f"amqtt did not start on {self.host}:{self.port} within "
                                 f"{timeout} s")
        if self._error is not None:
            err, self._error = self._error, None
            self.stop()
            raise TransportError(f"amqtt failed to start on {self.host}:{self.port}: {err}; "
                                 "the port may be taken") from err

    def _run(self) -> None:
        from amqtt.broker import Broker
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            self._broker = Broker(self._config(), loop=loop)
            await self._broker.start()

        try:
            loop.run_until_complete(boot())
        except BaseException as exc:  # reported to start()'s caller
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread, broker = self._loop, self._thread, self._broker
        if loop is not None and thread is not None and thread.is_alive():
            if broker is not None:
                fut = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
                try:
                    fut.result(timeout)
                except Exception as exc:  # keep stopping; the loop goes away below
                    log.warning("amqtt shutdown raised %r", exc)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
        self._loop = self._thread = self._broker = None
