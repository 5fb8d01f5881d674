"""dvr as a Neutron backend: the ML2 mechanism driver, the L3 plugin, and Neutron run
beside a lab."""
