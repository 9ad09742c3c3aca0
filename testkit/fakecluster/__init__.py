"""The Kubernetes API server's test double and the checks it shares with the tests.

- `fakeapi`: the fake API server (REST, watches, pagination, server-side apply, limits).
- `fakeauth`: its authentication, RBAC and admission, from packaging/kubernetes.
- `crdcheck`: the CRDs' OpenAPI schemas and CEL rules, evaluated as the API server does.

Not part of gatewayd: the tests and the benchmarks import it (scripts/setup installs it into
the virtualenv); the .deb and the image never contain it.
"""
