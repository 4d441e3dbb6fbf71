"""The control-plane URLs an agent may talk to, and the one rule for moving between them.

Replicas of orchestratord share one database, so any of them takes a node's registration and heartbeats.
The agent stays with the URL in use while it gives HTTP answers (any status: a 503 or a 404 is the replica
speaking, and another replica would say the same). Only when a URL gives no answer at all (refused,
timed out, reset, TLS failed) does the agent move on, to the next URL in the configured order, wrapping
round at the end. It never goes back to an earlier URL while the current one answers: when a lost replica
returns, its nodes stay spread over the others instead of stampeding back.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

# The most URLs an agent takes: more replicas than that are behind a load balancer, not listed per node.
MAX_CONTROL_URLS = 16
# The longest pause before trying the next URL. Every node of a lost replica switches at about the same
# moment; a random pause up to this spreads their registrations on the next replica over half a second,
# well inside one heartbeat interval.
SWITCH_JITTER_MAX_S = 0.5


class ControlUrls:
    """The URL ring: which URL is current, and how many URLs have failed in a row since one answered."""

    def __init__(self, urls: Sequence[str], switch_jitter_max_s: float = SWITCH_JITTER_MAX_S):
        if not urls:
            raise ValueError("at least one control-plane URL is needed")
        self.urls = tuple(url.rstrip("/") for url in urls)
        self._index = 0
        self._failed_in_a_row = 0
        self._switch_jitter_max_s = switch_jitter_max_s
        # Set when a round ended with every URL failed, until one answers: the switches of an outage's
        # retries are not news (the agent logs the outage once), the URL that ends it is.
        self.outage = False

    @property
    def current(self) -> str:
        return self.urls[self._index]

    @property
    def position(self) -> str:
        """'2 of 3': where the current URL stands in the list, for log lines."""
        return f"{self._index + 1} of {len(self.urls)}"

    @property
    def all_failed(self) -> bool:
        """Every URL has failed since the last answer: time for the caller's backoff, not another switch."""
        return self._failed_in_a_row >= len(self.urls)

    def answered(self) -> bool:
        """The current URL gave an HTTP answer: it stays current, and the run of failures ends. True when
        that answer ends an outage of every URL."""
        self._failed_in_a_row = 0
        ended, self.outage = self.outage, False
        return ended

    def failed(self) -> str | None:
        """The current URL gave no answer. Returns the URL that is current now when that moved (the next in
        the list, wrapping round), or None when there is no other URL to move to."""
        self._failed_in_a_row = min(self._failed_in_a_row + 1, len(self.urls))
        if self.all_failed:
            self.outage = True
        if len(self.urls) == 1:
            return None
        self._index = (self._index + 1) % len(self.urls)
        return self.current

    def switch_pause_s(self) -> float:
        """The random pause before the first request to a URL just switched to."""
        return random.uniform(0, self._switch_jitter_max_s)

    def start_round(self) -> None:
        """A new call begins: every URL gets a fresh chance, starting from the current one."""
        self._failed_in_a_row = 0
