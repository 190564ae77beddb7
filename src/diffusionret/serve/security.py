"""Access control of the HTTP service: Host allowlist, signed URLs, token rules, failed-login limits.

Everything here parses text an attacker controls, so every parser is total: any input either gives
a value or a clean refusal, never an exception from deep inside (``int()`` of ``"²"``, of 5,000
digits, ``hmac.compare_digest`` of non-ASCII text).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
from collections import OrderedDict
from typing import Callable, Iterable

# Names a browser sends for a server on loopback; a DNS-rebinding page sends its own domain instead.
LOOPBACK_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "[::1]")
ANY_HOST = "*"
MIN_TOKEN_CHARS = 16
# Signed URLs carry 10-digit UNIX times; 12 digits are enough until the year 33658.
MAX_EXPIRY_DIGITS = 12
_SIGNATURE_HEX_DIGITS = hashlib.sha256().digest_size * 2
_HEX = frozenset("0123456789abcdef")


def ascii_int(text: str | None, max_digits: int) -> int | None:
    """``int(text)`` for 1..``max_digits`` ASCII digits, ``None`` for anything else.

    ``str.isdigit`` accepts ``"²"`` and other Unicode digits that ``int`` refuses, and ``int`` refuses
    more than ``sys.get_int_max_str_digits()`` digits, so neither check alone is safe.
    """
    if not text or len(text) > max_digits or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def check_token(token: str | None) -> None:
    """Refuse a bearer token too short to resist guessing.

    Raises:
        ValueError: the token is empty or shorter than :data:`MIN_TOKEN_CHARS` characters.
    """
    if token is None:
        return
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the token must be at least {MIN_TOKEN_CHARS} characters long, got {len(token)} "
                         "(generate one with e.g. `openssl rand -hex 24`)")


def normalise_host(host: str) -> str:
    """The form a ``Host`` header uses for ``host``: lower case, IPv6 addresses in brackets."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        return host
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]"
    except ValueError:
        pass
    return host


def host_of(header: str) -> str:
    """The host part of a ``Host`` header (``name``, ``name:port``, ``[v6]`` or ``[v6]:port``), lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        return header[: end + 1] if end > 0 else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostAllowlist:
    """Which ``Host`` headers the service answers: the DNS-rebinding defence.

    A page on ``evil.example`` can make its name resolve to 127.0.0.1 and then read this server as
    same-origin; its requests still say ``Host: evil.example``, which is refused.

    Args:
        hosts: allowed names or addresses (``"*"`` allows every host: only behind a proxy that checks).
    """

    def __init__(self, hosts: Iterable[str]) -> None:
        hosts = [h for h in hosts if h.strip()]
        self.any = ANY_HOST in hosts
        self.hosts = frozenset(normalise_host(h) for h in hosts if h != ANY_HOST)

    def allows(self, header: str | None) -> bool:
        if self.any:
            return True
        return bool(header) and host_of(header) in self.hosts  # type: ignore[arg-type]


class UrlSigner:
    """Expiring HMAC signatures for media and thumbnail URLs.

    The key is random (per process unless given), never the bearer token: a signed URL that leaks
    (browser history, a proxy log) must not let anyone test token guesses offline. URLs therefore
    stop working when the server restarts; the page fetches fresh ones with every search.

    Args:
        token: the bearer token; ``None`` turns signing off (the service is open).
        ttl_s: lifetime of a URL.
        key: the HMAC key (default: 32 random bytes).
        clock: UNIX time source.
    """

    def __init__(self, token: str | None, ttl_s: int, key: bytes | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._key = (key or secrets.token_bytes(32)) if token else None
        self._ttl_s = ttl_s
        self._clock = clock

    def _mac(self, kind: str, video_id: str, expires: int) -> str:
        assert self._key is not None
        return hmac.new(self._key, f"{kind}:{video_id}:{expires}".encode(), hashlib.sha256).hexdigest()

    def url(self, kind: str, video_id: str) -> str:
        base = f"/{kind}/{video_id}"
        if self._key is None:
            return base
        # Round the expiry so that repeated searches give identical URLs (browser caching works).
        expires = (int(self._clock()) // 600 + 1) * 600 + self._ttl_s
        return f"{base}?exp={expires}&sig={self._mac(kind, video_id, expires)}"

    def valid(self, kind: str, video_id: str, expires: str | None, signature: str | None) -> bool:
        """Whether ``?exp=&sig=`` sign this URL and have not expired; ``False`` for any malformed value."""
        when = ascii_int(expires, MAX_EXPIRY_DIGITS)
        if self._key is None or when is None or signature is None or when < self._clock():
            return False
        # compare_digest refuses non-ASCII str: only well-formed hex reaches it.
        if len(signature) != _SIGNATURE_HEX_DIGITS or not set(signature) <= _HEX:
            return False
        return hmac.compare_digest(self._mac(kind, video_id, when), signature)


class FailureLimiter:
    """Bounds failed authentications per client address (token bucket), against online guessing.

    Each client may fail ``burst`` times at once, then one more time per ``60 / per_minute`` seconds.
    Only requests that present a credential count: a page that has not been given the token yet
    is not guessing. At most ``max_clients`` addresses are remembered (the least recently failing
    are forgotten first), so a flood of addresses cannot grow memory.

    Thread-safe: called from the event loop and from sync route threads.
    """

    def __init__(self, per_minute: int, burst: int, *, clock: Callable[[], float] = time.monotonic,
                 max_clients: int = 4096) -> None:
        if per_minute <= 0 or burst <= 0 or max_clients <= 0:
            raise ValueError("per_minute, burst and max_clients must be positive")
        self._rate = per_minute / 60.0
        self._burst = float(burst)
        self._clock = clock
        self._max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)
        self._lock = threading.Lock()

    def _tokens(self, client: str, now: float) -> float:
        tokens, at = self._buckets.get(client, (self._burst, now))
        return min(self._burst, tokens + (now - at) * self._rate)

    def retry_after(self, client: str) -> int:
        """Seconds until ``client`` may try again (0: it may try now)."""
        with self._lock:
            tokens = self._tokens(client, self._clock())
        return 0 if tokens >= 1.0 else max(1, int((1.0 - tokens) / self._rate + 0.999))

    def failed(self, client: str) -> None:
        """Record one failed attempt by ``client``."""
        with self._lock:
            now = self._clock()
            self._buckets[client] = (max(0.0, self._tokens(client, now) - 1.0), now)
            self._buckets.move_to_end(client)
            while len(self._buckets) > self._max_clients:
                self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)
