"""Large arguments go to the cluster once: scattered, and referred to by the tasks."""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterator
from typing import Any

from ..._serde import dumps
from .._base import WorkerSetup
from ._setup import _SetupPlugin

log = logging.getLogger("amortune")

#: A chunk whose pickled items are larger than this is scattered to a worker first instead of
#: travelling inside the task through the scheduler.
SCATTER_ITEMS_BYTES = 1 << 20
#: A function, initializer or environment whose pickle is larger than this is scattered to every
#: worker once (per token) and tasks refer to it; a smaller one travels inside each task, which
#: is cheaper than the scatter's round trip.
SCATTER_SHARED_BYTES = 32 << 10
#: Shared values (functions, environments, initializers) kept on the cluster per backend.
_SHARED_CACHE_SIZE = 32


def _scatter_items(client: Any, items: bytes) -> Any:
    """A future of large pickled ``items`` on one worker, else ``None`` (they go in the task)."""
    if len(items) > SCATTER_ITEMS_BYTES:
        return client.scatter(items, hash=False)
    return None


class _Shared:
    """What one backend put on every worker: shared values by ``"kind:token"``, and plugins.

    Iterating gives the names of the values on the cluster, least recently used first.
    ``lock`` is the backend's.
    """

    def __init__(self, client: Any, lock: threading.Lock) -> None:
        self.client = client
        self._lock = lock
        self._refs: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._plugins: set[str] = set()

    def __iter__(self) -> Iterator[str]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def share(self, kind: str, token: str, value: Any, size: int | None = None) -> Any:
        """``value`` itself when small, else a future of it on every worker, scattered once
        per token by this backend (the worker receives the value either way)."""
        if size is None:
            size = len(value) if isinstance(value, bytes) else len(dumps(value))
        if size <= SCATTER_SHARED_BYTES:
            return value
        name = f"{kind}:{token}"
        with self._lock:
            ref = self._refs.get(name)
            if ref is not None and ref.status == "finished":
                self._refs.move_to_end(name)
                return ref
        ref = self.client.scatter([value], broadcast=True, hash=False)[0]  # a list: one value
        evicted = []
        with self._lock:
            self._refs[name] = ref
            while len(self._refs) > _SHARED_CACHE_SIZE:
                evicted.append(self._refs.popitem(last=False)[1])
        for old in evicted:  # tasks still waiting on one keep it on the cluster until they ran
            old.release()
        return ref

    def setup_args(self, setup: WorkerSetup | None) -> tuple[Any, ...]:
        """The set-up arguments of a chunk task, the large ones shared."""
        if setup is None:
            return (None, None, None, None, None)
        env_token = setup.env_token
        env_ref = None
        if env_token is not None and setup.env is not None:
            size = sum(len(k) + len(v) + 8 for k, v in setup.env)
            env_ref = self.share("env", env_token, setup.env, size)
        init_token = setup.init_token
        init_ref = None
        if init_token is not None:
            init_ref = self.share("init", init_token, setup.init_payload)
            self._register_setup(init_token, setup)
        return (init_token, init_ref, env_token, env_ref, setup.thread_cap)

    def _register_setup(self, init_token: str, setup: WorkerSetup) -> None:
        """Install the initializer as a worker plugin: it runs in every worker, also in those
        that start later, before their first chunk. Each task checks again, so a worker that
        missed the plugin still runs the initializer first, and never twice."""
        name = f"amortune-setup-{init_token}"
        with self._lock:
            if name in self._plugins:
                return
            self._plugins.add(name)
        plugin = _SetupPlugin(init_token, setup.init_payload, setup.env_token, setup.env,
                              setup.thread_cap)
        register = (getattr(self.client, "register_plugin", None)
                    or self.client.register_worker_plugin)
        try:
            register(plugin, name=name)
        except Exception as exc:  # the tasks run the initializer themselves
            log.debug("amortune: could not register the worker set-up plugin: %r", exc)

    def release(self) -> None:
        """Release the shared values and unregister the plugins."""
        with self._lock:
            shared = list(self._refs.values())
            self._refs.clear()
            plugins = sorted(self._plugins)
        for ref in shared:
            try:
                ref.release()
            except Exception:
                pass
        for name in plugins:
            try:
                self.client.unregister_worker_plugin(name)
            except Exception:
                pass
