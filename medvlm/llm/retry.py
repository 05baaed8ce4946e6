"""How long to wait before resending a request the server refused for now (HTTP 429, 5xx, a dropped
connection): the server's ``Retry-After`` when it sends one, else exponential backoff with jitter.

``Retry-After`` is read as RFC 9110 section 10.2.3 defines it (delay-seconds, or an HTTP-date),
after the non-standard ``retry-after-ms`` that OpenAI's API sends (the order the openai-python
client reads them in: ``src/openai/_base_client.py``, ``_parse_retry_after_header``). A delay is
never longer than ``max_wait``: a server asking for an hour gets ``max_wait`` and a log line.
"""

from __future__ import annotations

import email.utils
import logging
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# Statuses worth resending after a wait: request timeout, rate limit, any server-side error.
RETRY_STATUSES = frozenset({408, 429})


def should_retry_status(status: int) -> bool:
    """True for 408, 429 and every 5xx: the server may answer differently after a wait."""
    return status in RETRY_STATUSES or status >= 500


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the server asks us to wait, or None when it says nothing usable.

    ``retry-after-ms`` (milliseconds) wins over ``Retry-After`` (seconds or an HTTP-date, which is
    turned into seconds from ``now``); negative or unparsable values count as not given, a date in
    the past as 0.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        raw = (lower.get(name) or "").strip()
        if not raw:
            continue
        try:
            value = float(raw) / scale
        except ValueError:
            if name == "retry-after-ms":
                continue
            parsed = email.utils.parsedate_tz(raw)
            if parsed is None:
                return None
            return max(0.0, email.utils.mktime_tz(parsed) - (time.time() if now is None else now))
        if math.isfinite(value) and value >= 0:
            return value
    return None


@dataclass
class Backoff:
    """Delay before retry number ``attempt`` (0 = the first resend).

    Without a server hint: ``base * 2**attempt``, times a jitter factor drawn from [0.5, 1] so
    that parallel requests refused together do not come back together, capped at ``max_wait``.
    With ``retry_after`` (from :func:`parse_retry_after`): exactly that, capped at ``max_wait``.
    ``base = 0`` never waits (tests, or a server on the same machine).
    """

    base: float = 1.0
    max_wait: float = 60.0
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        if self.base < 0 or self.max_wait < 0:
            raise ValueError(f"backoff base and max_wait must be >= 0 seconds, got {self.base}, {self.max_wait}")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            if retry_after > self.max_wait:
                logger.warning("server asked to wait %.0f s before retrying; waiting %.0f s (the cap)",
                               retry_after, self.max_wait)
            return min(retry_after, self.max_wait)
        return min(self.max_wait, self.base * 2.0 ** attempt) * self.rng.uniform(0.5, 1.0)
