"""The in-cluster controller (`gatewayd controller`): it watches policies, pods, namespaces,
nodes, gateways and their Leases, decides per policy which gateways serve it (health-aware,
sticky, make-before-break), and writes every EgressGateway's and EgressNode's plan and every
policy's status. `reconcile.py` decides (no I/O); `daemon.py` runs informers, leader election
and the loop; `writer.py` writes only what differs.
"""
