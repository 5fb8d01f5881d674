"""`dvr lab`: a multi-node cloud on one machine (`lab.py`), built with netlink
(`netlink.py`), commands run inside its namespaces (`run.py`) and real packets captured and
sent with scapy (`capture.py`)."""


class LabError(Exception):
    """A lab operation failed; the message is one line for the operator."""
