"""Leader election on a Lease: of all controller replicas, only the holder writes.

Timings are client-go's defaults unless configured: a 15 s lease, a 10 s renew deadline and a
2 s retry period. The holder renews every retry period. It stops counting itself leader when it
has not renewed for the renew deadline, before another replica may take the Lease over: a
replica takes over only when it has seen the Lease unchanged for a whole lease duration on its
own monotonic clock (the holder's clock, written into `renewTime`, is never trusted). So two
replicas never both believe they lead, as long as their clocks advance at about the same rate.
On a clean stop the holder hands the Lease back, so the other replica takes over at its next
attempt instead of after a whole duration.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from http import HTTPStatus

import urllib3
from kubernetes.client import ApiClient, CoordinationV1Api
from kubernetes.client.exceptions import ApiException

from gatewayd.kube.leases import LeaseObserver, renew_lease

log = logging.getLogger(__name__)

LEADER_LEASE = "gatewayd-controller"
# client-go's defaults (k8s.io/client-go/tools/leaderelection), in seconds.
LEASE_DURATION = 15
RENEW_DEADLINE = 10.0
RETRY_PERIOD = 2.0


class LeaderElector:
    def __init__(
        self,
        api: ApiClient,
        namespace: str,
        identity: str,
        lease_duration: int,
        on_change: Callable[[], None],
        *,
        renew_deadline: float | None = None,
        retry_period: float | None = None,
        lease_name: str = LEADER_LEASE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`renew_deadline` and `retry_period` default to client-go's proportions of the lease
        duration (10/15 and 2/15: 10 s and 2 s for a 15 s lease)."""
        self._api = api
        self.namespace = namespace
        self.identity = identity
        self.lease_name = lease_name
        self.lease_duration = lease_duration
        scale = lease_duration / LEASE_DURATION
        self.renew_deadline = RENEW_DEADLINE * scale if renew_deadline is None else renew_deadline
        self.retry_period = RETRY_PERIOD * scale if retry_period is None else retry_period
        if not self.retry_period < self.renew_deadline < lease_duration:
            raise ValueError(
                f"leader election needs retry period ({self.retry_period}s) < renew deadline "
                f"({self.renew_deadline}s) < lease duration ({lease_duration}s)"
            )
        self._on_change = on_change
        self._clock = clock
        self._observer = LeaseObserver(monotonic=clock)
        self._lock = threading.Lock()
        self._renewed_at: float | None = None  # when the last successful renewal started
        # When the API last answered an attempt (at first: when the elector was made).
        self._answered_at = clock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leader-election", daemon=True)

    @property
    def is_leader(self) -> bool:
        with self._lock:
            renewed = self._renewed_at
        return renewed is not None and self._clock() < renewed + self.renew_deadline

    @property
    def api_reachable(self) -> bool:
        """Whether the API answered one of the last attempts (held or not)."""
        with self._lock:
            answered = self._answered_at
        return self._clock() < answered + 2 * self.retry_period

    def start(self) -> None:
        self._thread.start()

    def stop(self, release: bool = True) -> None:
        self._stopping.set()
        self._thread.join(self.renew_deadline + 5)
        if release and self.is_leader:
            self._release()
        with self._lock:
            self._renewed_at = None

    def _run(self) -> None:
        state = (False, False)
        while not self._stopping.is_set():
            started = self._clock()
            try:
                held = renew_lease(
                    self._api,
                    self.namespace,
                    self.lease_name,
                    self.identity,
                    self.lease_duration,
                    self._observer,
                )
            except (ApiException, urllib3.exceptions.HTTPError, OSError) as error:
                log.warning(
                    "leader election: cannot renew Lease %s/%s: %s",
                    self.namespace,
                    self.lease_name,
                    error,
                )
            else:
                with self._lock:
                    self._answered_at = started
                    self._renewed_at = started if held else None
            now_state = (self.is_leader, self.api_reachable)
            if now_state != state:
                if now_state[0] != state[0]:
                    log.info(
                        "leader election: %s %s Lease %s/%s",
                        self.identity,
                        "holds" if now_state[0] else "does not hold",
                        self.namespace,
                        self.lease_name,
                    )
                state = now_state
                self._on_change()
            self._stopping.wait(max(0.0, started + self.retry_period - self._clock()))

    def _release(self) -> None:
        """Hand the Lease back: no holder, so any other replica may take it at once."""
        leases = CoordinationV1Api(self._api)
        try:
            lease = leases.read_namespaced_lease(self.lease_name, self.namespace)
            if (
                lease.spec is None
                or lease.metadata is None
                or lease.spec.holder_identity != self.identity
            ):
                return
            leases.patch_namespaced_lease(
                self.lease_name,
                self.namespace,
                {
                    "metadata": {"resourceVersion": lease.metadata.resource_version},
                    "spec": {"holderIdentity": None},
                },
            )
        except ApiException as error:
            if error.status != HTTPStatus.CONFLICT:
                log.warning("leader election: could not release the Lease: %s", error)
        except (urllib3.exceptions.HTTPError, OSError) as error:
            log.warning("leader election: could not release the Lease: %s", error)
        else:
            log.info(
                "leader election: %s released Lease %s/%s",
                self.identity,
                self.namespace,
                self.lease_name,
            )
