"""The thin Kubernetes layer: API clients, resource names, Lease helpers and list+watch caches.

Everything here talks to the API server through the official `kubernetes` client; nothing in
`gatewayd.policy` or `gatewayd.dataplane` imports it.
"""
