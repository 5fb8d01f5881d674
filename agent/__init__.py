"""dvr-agent: the per-node agent that keeps Open vSwitch in step with the desired state."""

import sys


def _ovs_without_eventlet() -> None:
    """The ovs bindings import eventlet, when it is installed (os-ken's dependencies bring
    it), only to ask whether it has patched select(), which nothing here does: 17 MB of
    every agent's memory. They are imported first with eventlet hidden; a process that has
    imported eventlet already (neutron-server) keeps it."""
    if "eventlet" in sys.modules or "ovs.poller" in sys.modules:
        return
    sys.modules["eventlet"] = None  # type: ignore[assignment]
    try:
        import ovs.poller  # noqa: F401
    except ImportError:  # pragma: no cover - the ovs bindings are a dependency
        pass
    finally:
        del sys.modules["eventlet"]


_ovs_without_eventlet()
