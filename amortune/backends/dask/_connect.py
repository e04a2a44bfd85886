"""Which client a Dask backend uses: the active one, one passed in, or one of ours per address."""

from __future__ import annotations

import asyncio
import atexit
import threading
from typing import Any

import distributed
from distributed.deploy.cluster import Cluster

from ..._errors import AmortuneError

#: ``distributed.Client``, typed loosely (its constructor has no annotations).
Client: Any = distributed.Client

#: Seconds to wait for a scheduler given by address before giving up.
CONNECT_TIMEOUT_SECONDS = 10.0
#: Seconds ``shutdown`` gives the cluster to unregister plugins and a client of ours to close.
_CLOSE_TIMEOUT_SECONDS = 5.0


class DaskConnectionError(AmortuneError, ConnectionError):
    """No Dask scheduler could be reached (an address that does not answer, or no client)."""


def _resolve_client(client: Any, connect_timeout: float, security: Any) -> tuple[Any, bool]:
    """``(the client to use, whether it is one of ours)`` for ``DaskBackend(client, ...)``."""
    owns = False
    if client is None:
        try:
            client = Client.current()
        except ValueError:
            raise DaskConnectionError(
                "backend='dask' needs a running distributed.Client in this process (create "
                "one with distributed.Client(address)), or pass the client or the "
                "scheduler's address as backend=") from None
    elif isinstance(client, str):
        client = _acquire_client(client, connect_timeout, security)
        owns = True
    elif isinstance(client, Cluster):
        client = _acquire_client(client.scheduler_address, connect_timeout,
                                 security or getattr(client, "security", None))
        owns = True
    elif not isinstance(client, Client):
        raise TypeError(f"expected a distributed.Client, a scheduler address or None, got "
                        f"{type(client).__name__}")
    if client.asynchronous:
        raise AmortuneError("the Dask backend needs a synchronous distributed.Client "
                            "(asynchronous=False)")
    return client, owns


#: Clients this package connected, by (address, security), with how many backends use each: the
#: backends of one address share one connection, closed when the last of them shuts down (or by
#: :func:`close_connections`, or at exit).
_CONNECTIONS: dict[tuple[str, int], list[Any]] = {}
_CONNECTIONS_LOCK = threading.Lock()


def _acquire_client(address: str, timeout: float, security: Any) -> Any:
    key = (address, id(security) if security is not None else 0)
    with _CONNECTIONS_LOCK:
        entry = _CONNECTIONS.get(key)
        if entry is not None and entry[0].status == "running":
            entry[1] += 1
            return entry[0]
        client = _connect(address, timeout, security)
        if entry is not None:
            _close_quietly(entry[0])
        _CONNECTIONS[key] = [client, 1, security]  # holding security keeps its id unique
        return client


def _release_client(client: Any) -> None:
    with _CONNECTIONS_LOCK:
        for key, entry in list(_CONNECTIONS.items()):
            if entry[0] is client:
                entry[1] -= 1
                if entry[1] > 0:
                    return
                del _CONNECTIONS[key]
                break
    _close_quietly(client)


def close_connections() -> None:
    """Close every client amortune connected to a scheduler address (at exit, too).

    Backends still using one fail their next chunk; a client passed in is never touched.
    """
    with _CONNECTIONS_LOCK:
        clients = [entry[0] for entry in _CONNECTIONS.values()]
        _CONNECTIONS.clear()
    for client in clients:
        _close_quietly(client)


def _close_quietly(client: Any) -> None:
    try:
        client.close(timeout=_CLOSE_TIMEOUT_SECONDS)
    except Exception:
        pass


atexit.register(close_connections)


def _connect(address: str, timeout: float, security: Any) -> Any:
    try:
        return Client(address, timeout=timeout, security=security, set_as_default=False)
    except Exception as exc:
        _stop_half_made_client(exc)
        if isinstance(exc, (OSError, TimeoutError, asyncio.TimeoutError)):
            hint = "check the address, that the scheduler runs and that this machine may reach it"
        elif address.startswith("tls://"):
            hint = ("a tls:// address needs a security configuration: pass security="
                    "distributed.security.Security(...) or set Dask's distributed.comm.tls options")
        else:
            hint = "check the address"
        raise DaskConnectionError(f"could not connect to the Dask scheduler at {address} "
                                  f"within {timeout:g} s ({exc}); {hint}") from exc


def _stop_half_made_client(exc: BaseException) -> None:
    """A client whose first connection failed keeps its event-loop thread running: stop it."""
    tb = exc.__traceback__
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        if isinstance(obj, Client):
            runner = getattr(obj, "_loop_runner", None)
            try:
                obj.close(timeout=1)
                if runner is not None:
                    runner.stop()
            except Exception:
                pass
            return
        tb = tb.tb_next
