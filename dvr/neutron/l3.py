"""The L3 service plugin `dvr`: Neutron's routers, their interfaces and gateways, and
floating IPs into dvr's northbound database (the database-only mixins keep them in
Neutron's database; no L3 agent is scheduled: every dvr agent routes).

Floating IPs are created DOWN and turn ACTIVE once the agent of their VM's node reports
them NATed (the mechanism driver's status thread).
"""

from __future__ import annotations

from typing import Any

from neutron.db import extraroute_db, l3_gwmode_db
from neutron.db.models import l3 as l3_models
from neutron.quota import resource_registry
from neutron_lib import constants as n_const
from neutron_lib import exceptions as n_exc
from neutron_lib.api.definitions import extraroute, l3_ext_gw_mode
from neutron_lib.api.definitions import l3 as l3_apidef
from neutron_lib.callbacks import events, registry, resources
from neutron_lib.plugins import constants as plugin_constants
from neutron_lib.services import base as service_base
from oslo_log import log as logging

from dvr.neutron import driver
from dvr.neutron.driver import WRITER, network_edit, port_edit, router_edit

LOG = logging.getLogger(__name__)


@registry.has_registry_receivers
class DvrL3Plugin(service_base.ServicePluginBase,
                  extraroute_db.ExtraRoute_dbonly_mixin,
                  l3_gwmode_db.L3_NAT_dbonly_mixin):
    """Routers and floating IPs, distributed by dvr."""

    _supported_extension_aliases = [l3_apidef.ALIAS, l3_ext_gw_mode.ALIAS, extraroute.ALIAS]

    @resource_registry.tracked_resources(router=l3_models.Router,
                                         floatingip=l3_models.FloatingIP)
    def __init__(self) -> None:
        super().__init__()
        LOG.info("dvr L3 plugin")

    @property
    def supported_extension_aliases(self) -> list[str]:
        return self._supported_extension_aliases

    def get_plugin_type(self) -> str:
        return plugin_constants.L3

    def get_plugin_description(self) -> str:
        return "dvr: distributed routing, floating IPs on the VM's node, HA SNAT"

    def create_floatingip(self, context: Any, floatingip: Any,
                          initial_status: str = n_const.FLOATINGIP_STATUS_DOWN) -> Any:
        return super().create_floatingip(context, floatingip, initial_status)

    def add_router_interface(self, context: Any, router_id: str,
                             interface_info: Any = None) -> Any:
        """As Neutron's, refusing a network another router holds already: a network's
        gateway belongs to one router in dvr (its router answers for it on every node)."""
        info = interface_info or {}
        network_id = None
        if info.get("subnet_id"):
            network_id = self._core_plugin.get_subnet(context, info["subnet_id"])["network_id"]
        elif info.get("port_id"):
            network_id = self._core_plugin.get_port(context, info["port_id"])["network_id"]
        if network_id:
            others = {p["device_id"] for p in self._core_plugin.get_ports(
                context, filters={"network_id": [network_id],
                                  "device_owner": list(driver.INTERFACE_OWNERS)})}
            others.discard(router_id)
            if others:
                raise n_exc.BadRequest(resource="router", msg=(
                    f"network {network_id} is on router {sorted(others)[0]} already: in dvr "
                    "a network is on one router"))
        return super().add_router_interface(context, router_id, interface_info)

    # --- events, after commit ----------------------------------------------------------
    @registry.receives(resources.ROUTER, [events.AFTER_CREATE, events.AFTER_UPDATE])
    def _router_changed(self, resource: Any, event: Any, trigger: Any, payload: Any) -> None:
        WRITER.apply(f"router {payload.resource_id}",
                     [router_edit(payload.context.elevated(), payload.resource_id)])

    @registry.receives(resources.ROUTER, [events.AFTER_DELETE])
    def _router_deleted(self, resource: Any, event: Any, trigger: Any, payload: Any) -> None:
        WRITER.apply(f"router {payload.resource_id} deleted",
                     [driver.put_entry("routers", payload.resource_id, None)])

    @registry.receives(resources.ROUTER_INTERFACE, [events.AFTER_CREATE, events.AFTER_DELETE])
    def _interface(self, resource: Any, event: Any, trigger: Any, payload: Any) -> None:
        ctx = payload.context.elevated()
        port = (payload.metadata or {}).get("port") or {}
        edits = [router_edit(ctx, payload.resource_id)]
        if port.get("network_id"):
            edits.insert(0, network_edit(ctx, port["network_id"]))
        WRITER.apply(f"router {payload.resource_id} interface {event}", edits)

    @registry.receives(resources.FLOATING_IP,
                       [events.AFTER_CREATE, events.AFTER_UPDATE, events.AFTER_DELETE])
    def _floating_ip(self, resource: Any, event: Any, trigger: Any, payload: Any) -> None:
        ctx = payload.context.elevated()
        ports = []
        for state in payload.states or ():
            if isinstance(state, dict) and state.get("port_id"):
                ports.append(state["port_id"])
        if not ports:
            return
        WRITER.apply(f"floating IP {payload.resource_id} {event}",
                     [port_edit(ctx, p) for p in dict.fromkeys(ports)])
