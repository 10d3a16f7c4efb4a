"""How the fleet reaches Redis from one URL: a plain ``redis://``, a TLS ``rediss://``, or
Sentinel's, for the broker and every other client alike.

Teams run Redis with replicas and Sentinel so that a lost primary is replaced in seconds.
``REDIS_URL`` may then name the Sentinels instead of a Redis::

    sentinel://[:PASSWORD@]HOST:PORT[;sentinel://HOST:PORT...][/DB]?master=NAME

(Celery's own form, ``sentinel://h1:26379;sentinel://h2:26379``, with ``master=NAME`` on
the last part). ``PASSWORD`` is the primary's (``requirepass``); Sentinels that want one
of their own take ``sentinel_password=...``. Every client asks the Sentinels where the
primary is, and asks again when a connection to it fails, so the broker (kombu's
``sentinel://`` transport), the ledger, GPU leases and the backlog exporter all follow a
failover. Replication is asynchronous: the last writes before one can be lost, which
the fleet treats as it treats a Redis restart (the store is the record; the watchdog and
``resume`` redo what is missing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.sentinel import Sentinel, SentinelManagedConnection

from shared.records.errors import EmbedFleetError

SENTINEL_SCHEME = "sentinel"
DEFAULT_SENTINEL_PORT = 26379
FORM = "sentinel://[:PASSWORD@]HOST:26379[;sentinel://HOST2:26379...][/DB]?master=NAME"
# Seconds a Sentinel may take to answer where the primary is.
_SENTINEL_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class SentinelTarget:
    """A Redis primary known by the Sentinels that watch it.

    Attributes:
        sentinels: Their (host, port) pairs.
        master: The name they know the primary by (``sentinel monitor NAME ...``).
        db: The database number.
        username: The primary's user, if any.
        password: The primary's password, if any.
        sentinel_password: The Sentinels' own password, if they have one.
    """

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def is_sentinel(url: str) -> bool:
    return url.split(":", 1)[0].lower() == SENTINEL_SCHEME


def parse_sentinel(url: str) -> SentinelTarget:
    """The target of a Sentinel URL (see the module doc).

    Raises:
        EmbedFleetError: without a Sentinel address or a master name, or with a part
            that is not a ``sentinel://`` URL.
    """
    sentinels: list[tuple[str, int]] = []
    db, master, username, password, sentinel_password = 0, "", None, None, None
    for part in url.split(";"):
        found = urlsplit(part.strip())
        if found.scheme.lower() != SENTINEL_SCHEME or not found.hostname:
            raise EmbedFleetError(
                f"{part.split('@')[-1]!r} is not a Sentinel address in REDIS_URL", f"Use {FORM}"
            )
        sentinels.append((found.hostname, found.port or DEFAULT_SENTINEL_PORT))
        username = unquote(found.username) if found.username else username
        password = unquote(found.password) if found.password else password
        if found.path.strip("/"):
            try:
                db = int(found.path.strip("/"))
            except ValueError:
                raise EmbedFleetError(
                    f"the database {found.path.strip('/')!r} of REDIS_URL is not a number",
                    f"Use {FORM}",
                ) from None
        query = parse_qs(found.query)
        master = query.get("master", query.get("master_name", [master]))[0]
        sentinel_password = query.get("sentinel_password", [sentinel_password])[0]
    if not master:
        raise EmbedFleetError(
            "REDIS_URL names Sentinels but not the primary they watch",
            f"Add ?master=NAME, the name of `sentinel monitor NAME ...`: {FORM}",
        )
    return SentinelTarget(
        tuple(sentinels), master, db, username or None, password or None, sentinel_password
    )


def redis_client(url: str, **options: Any) -> redis.Redis:
    """A client of the Redis a URL names: ``redis.Redis.from_url`` for a plain or TLS
    URL (its query may carry ``ssl_ca_certs`` and the like), the Sentinels' current
    primary for a Sentinel URL. ``options`` are the connections' (timeouts, retry)."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    target = parse_sentinel(url)
    watchers = Sentinel(
        list(target.sentinels),
        sentinel_kwargs={
            "socket_timeout": _SENTINEL_TIMEOUT_S,
            "socket_connect_timeout": _SENTINEL_TIMEOUT_S,
            **({"password": target.sentinel_password} if target.sentinel_password else {}),
        },
    )
    client: redis.Redis = watchers.master_for(
        target.master,
        redis_class=redis.Redis,
        db=target.db,
        username=target.username,
        password=target.password,
        redis_connect_func=primary_only,
        connection_class=FollowingConnection,
        **options,
    )
    return client


class FollowingConnection(SentinelManagedConnection):
    """A connection to the Sentinels' primary that asks them where it is on every
    (re)connect.

    redis-py's own (8.2) asks them only in ``connect()``; a command whose connection
    broke mid-flight (its primary killed) is retried through ``send_packed_command``,
    which reconnects by ``connect_check_health`` to the address the connection had: the
    dead primary, again and again until the client's retries (the transient window) run
    out. A worker was seen stuck so for minutes after a failover the rest of the fleet
    had followed in seconds.
    """

    def _connect(self) -> Any:
        if self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        return super()._connect()  # type: ignore[no-untyped-call]


def primary_only(connection: Any) -> None:
    """Set a new connection up as usual, then make sure it reached a primary.

    Right after a failover a Sentinel that has not yet heard of it may still name the
    old primary, which may be back already as the new one's replica, empty until it has
    synced: a reader there would find no job at all. So a connection to anything but a
    primary is a connection error, which the client's retry answers by asking the
    Sentinels again (a second later they agree).

    Raises:
        redis.ConnectionError: if the server is a replica.
    """
    connection.on_connect()
    connection.send_command("ROLE")
    role = connection.read_response()
    kind = role[0].decode() if role and isinstance(role[0], bytes) else str(role[0] if role else "")
    if kind != "master":
        raise redis.ConnectionError(
            f"{connection.host}:{connection.port} is a {kind or 'server of no role'}, not the "
            "primary: a failover is under way"
        )


def celery_broker(url: str) -> tuple[str, dict[str, Any]]:
    """The broker URL kombu reads and the transport options it needs for it: a Sentinel
    URL becomes kombu's (``sentinel://...;sentinel://.../DB``) with ``master_name`` and
    a socket timeout, so that a consumer on a primary that vanished without closing its
    connection notices, asks the Sentinels again and reconnects to the new primary."""
    if not is_sentinel(url):
        return url, {}
    target = parse_sentinel(url)
    auth = ""
    if target.password:
        auth = f"{target.username or ''}:{target.password}@"
    parts = [f"sentinel://{auth}{host}:{port}/{target.db}" for host, port in target.sentinels]
    options: dict[str, Any] = {"master_name": target.master, "socket_timeout": 10.0}
    if target.sentinel_password:
        options["sentinel_kwargs"] = {"password": target.sentinel_password}
    return ";".join(parts), options
