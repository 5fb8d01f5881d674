"""`dvr neutron-sync`: compare what Neutron holds with dvr's northbound database, and
report (`log`) or repair (`repair`) every difference, as `neutron-ovn-db-sync-util` does for
OVN. Neutron is the source of truth: a repair writes what Neutron's resources make
(`translate.desired`), in one transaction; the nodes, and the HA chains the scheduler keeps,
stay the northbound's own.

Neutron's state is read through its REST API (`state_from_api`: any host that reaches the
API and the database can run it, nothing of Neutron installed) or, inside neutron-server,
through its plugins (`state_from_plugins`: the driver's repair after a lost write, and when
neutron-server starts).

The driver's repair runs in its writer, after every write queued before it and before any
queued after: a snapshot is never older than what it overwrites. The command runs beside
the driver, as `neutron-ovn-db-sync-util` does: a change committed in Neutron between its read
and its write may be overwritten with the state read, until that object's next event or
the next sync; run `repair` when the cloud is quiet.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from typing import Any

from dvr import nb
from dvr.neutron import translate as tr

PAGE = 2000  # resources per API request (Neutron's pagination)


class SyncError(Exception):
    """Neutron or the northbound database could not be read or written."""


def _get(url: str, path: str, token: str | None, timeout: float) -> list[dict[str, Any]]:
    """Every resource of a collection, page by page (`limit` and `marker`)."""
    kind = path.rsplit("/", 1)[-1].replace("-", "_")
    out: list[dict[str, Any]] = []
    marker = None
    while True:
        query = {"limit": str(PAGE), **({"marker": marker} if marker else {})}
        req = urllib.request.Request(f"{url.rstrip('/')}/v2.0/{path}?"
                                     f"{urllib.parse.urlencode(query)}")
        if token:
            req.add_header("X-Auth-Token", token)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                page = json.load(resp)[kind]
        except (OSError, ValueError, KeyError) as exc:
            raise SyncError(f"Neutron API {url}: GET {path}: {exc}") from None
        out.extend(page)
        if len(page) < PAGE:
            return out
        marker = page[-1]["id"]


def state_from_api(url: str, token: str | None = None, timeout: float = 60.0
                   ) -> tr.NeutronState:
    return tr.NeutronState(
        networks=_get(url, "networks", token, timeout),
        subnets=_get(url, "subnets", token, timeout),
        ports=_get(url, "ports", token, timeout),
        routers=_get(url, "routers", token, timeout),
        floating_ips=_get(url, "floatingips", token, timeout))


def state_from_plugins(ctx: Any) -> tr.NeutronState:
    from neutron_lib.plugins import constants as plugin_constants
    from neutron_lib.plugins import directory

    core = directory.get_plugin()
    l3 = directory.get_plugin(plugin_constants.L3)
    return tr.NeutronState(
        networks=core.get_networks(ctx), subnets=core.get_subnets(ctx),
        ports=core.get_ports(ctx),
        routers=l3.get_routers(ctx) if l3 else [],
        floating_ips=l3.get_floatingips(ctx) if l3 else [])


def compare(state: tr.NeutronState, northbound: str, repair: bool, timeout: float = 10.0
            ) -> list[tr.Difference]:
    """The differences between Neutron's `state` and the northbound; with `repair`, fixed
    in one transaction (guarded: a change meanwhile makes it read again)."""
    try:
        conn = nb.Northbound(northbound, timeout=timeout)
    except nb.NbError as exc:
        raise SyncError(str(exc)) from None
    try:
        held = conn.dump()
        want = tr.desired(state, held.get("nodes", {}), held.get("external"))
        diffs = tr.differences(want, held)
        if repair and diffs:
            def edit(doc: dict[str, Any] | None) -> dict[str, Any]:
                if not doc:
                    raise nb.ChangeError("the northbound database holds no nodes yet")
                fresh = tr.desired(state, doc.get("nodes", {}), doc.get("external"))
                return tr.repaired(fresh, doc)

            conn.change(edit, effective=False)
        return diffs
    except nb.NbError as exc:
        raise SyncError(f"northbound database: {exc}") from None
    finally:
        conn.close()


def run(ctx: Any, northbound: str, repair: bool, timeout: float = 10.0
        ) -> list[tr.Difference]:
    """Inside neutron-server: the driver's repair."""
    return compare(state_from_plugins(ctx), northbound, repair, timeout)


def main(url: str, northbound: str, mode: str, token: str | None = None) -> int:
    """The command: prints each difference, then a summary line; 0 when in sync (or
    repaired), 1 when differences remain (log mode), 2 on an error."""
    started = time.monotonic()
    state = state_from_api(url, token)
    read = time.monotonic() - started
    diffs = compare(state, northbound, repair=mode == "repair")
    for d in diffs:
        print(f"{'repaired' if mode == 'repair' else 'differs'}: {d}")
    print(f"neutron-sync ({mode}): {len(state.networks)} networks, {len(state.ports)} ports, "
          f"{len(state.routers)} routers, {len(state.floating_ips)} floating IPs read in "
          f"{read:.2f} s; {len(diffs)} differences"
          f"{' repaired' if mode == 'repair' and diffs else ''}; "
          f"{time.monotonic() - started:.2f} s in all")
    return 1 if diffs and mode == "log" else 0
