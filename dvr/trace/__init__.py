"""`dvr trace`: follow one packet hop by hop across nodes, and say where it ends and why.

`expr.py` reads the packet's short expression; `offline.py` traces it through the planned
flows (no lab needed), `live.py` through the switches of a running lab; both give a
`report.Report`, which `report.py` renders.
"""
