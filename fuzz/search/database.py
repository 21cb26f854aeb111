"""Opening the Hypothesis example database of a fuzz run: a directory or a shared Redis.

A database is what makes a run resume rather than start over: Hypothesis replays the failing and
near-miss examples it holds before it generates anything new. Two forms:

- ``--database DIR``: Hypothesis's ``DirectoryBasedExampleDatabase``, one machine (or a shared
  filesystem).
- ``--database redis://HOST:PORT/N`` (``rediss://`` for TLS): Hypothesis's
  ``RedisExampleDatabase`` on database number N of that server; needs the ``redis`` package
  (``pip install 'gemma-fuzz[redis]'``).

N machines fuzzing one model share one database and one corpus:

- every machine runs ``fuzz run --database redis://HOST:6379/0 --seed I`` with its own seed I,
  so that they search different prompts while the database keys (model fingerprint, policy, BOS
  mode) are the same on all of them: a failure found and shrunk on machine A is the first example
  machine B replays in its next round of that policy;
- the corpus stays in git: each machine opens a pull request with its new case files. A case file
  is named by a hash of its signature and prompt, so two machines that find the same case write
  the same file name and the second pull request adds nothing new.

The database only speeds the search up; the corpus is the record. Losing the database (a Redis
restart without persistence, an expired key) loses search progress, never a regression case.
"""
from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from hypothesis.database import DirectoryBasedExampleDatabase, ExampleDatabase

REDIS_SCHEMES = ("redis", "rediss")
REDIS_INSTALL_HINT = "pip install 'gemma-fuzz[redis]'"

# One Redis often serves several projects (and Hypothesis's own default prefix is shared by every
# project that takes the defaults): a prefix of our own keeps gemma-fuzz's keys apart from theirs.
# Models, policies and BOS modes need no prefix of their own: the key Hypothesis derives from each
# search already holds the model fingerprint, the policy and the BOS mode (fuzz.run).
KEY_PREFIX = b"gemma-fuzz:hypothesis-example:"
# Hypothesis publishes every change on this channel for its listeners; per project for the same
# reason, so that another project's listener never decodes our examples.
LISTENER_CHANNEL = "gemma-fuzz:hypothesis-changes"
# Every fetch and save resets a key's time to live, so the keys of a model that is still fuzzed
# never expire. What does expire is a key nothing has touched for this long: a model whose weights
# changed (a new fingerprint, so new keys) or a policy no longer run. Hypothesis's default of 8 days
# suits a weekly job; 30 days lets a nightly job be paused (a holiday, a broken machine) without
# losing its progress, and still lets Redis reclaim the keys of models that are gone.
EXPIRE_AFTER = timedelta(days=30)
# A typo'd or firewalled host should fail at start within seconds, not after the operating
# system's TCP timeout (minutes); a server that stops answering mid-run should fail the run rather
# than hang it past its budget. Options in the URL's query string (?socket_timeout=...) win.
CONNECT_TIMEOUT_S = 5.0
SOCKET_TIMEOUT_S = 30.0

_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_REDIS_TYPO = re.compile(r"^rediss?:(?!//)", re.IGNORECASE)
_DB_PATH = re.compile(r"^/?(\d+)?$")


class DatabaseError(ValueError):
    """A --database spec that cannot be opened; the message names the spec and the fix.

    A ValueError, so that the command line reports it as an input error (exit 2)."""


def open_database(spec: Optional[str]) -> Optional[ExampleDatabase]:
    """The example database that SPEC names: None for None or "" (no database), a
    RedisExampleDatabase for ``redis://HOST:PORT/N`` or ``rediss://…``, else a directory
    database at that path (created if missing).

    A Redis server is pinged here, so that a wrong host, port or password fails when the run
    starts, not in the middle of it. Raises DatabaseError with the spec and the fix."""
    if not spec:
        return None
    scheme = _URL_SCHEME.match(spec)
    if scheme is not None and scheme.group(1).lower() in REDIS_SCHEMES:
        return _open_redis(spec)
    # Without this a mistyped URL ("redis:/host", "http://") would silently become a directory.
    if scheme is not None or _REDIS_TYPO.match(spec):
        raise DatabaseError(
            f"database {_redacted(spec)!r} is neither a Redis URL nor a directory; use "
            "redis://HOST:PORT/N, rediss://HOST:PORT/N (TLS) or a directory path")
    return _open_directory(spec)


def _open_directory(spec: str) -> DirectoryBasedExampleDatabase:
    path = Path(spec).expanduser()
    try:
        # Hypothesis would create it only at the first save; creating it now makes a path that
        # cannot be a directory (a file there, no permission) fail at start.
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DatabaseError(
            f"database directory {spec!r} cannot be created ({err.strerror or err}); "
            "give a writable directory path or redis://HOST:PORT/N") from None
    return DirectoryBasedExampleDatabase(str(path))


def _open_redis(spec: str) -> ExampleDatabase:
    shown = _redacted(spec)
    try:
        import redis
        from hypothesis.extra.redis import RedisExampleDatabase
    except ImportError:
        raise DatabaseError(
            f"database {shown!r} needs the redis package: {REDIS_INSTALL_HINT} "
            "(or pip install 'redis>=5'), or give a directory path instead") from None
    # redis-py reads the database number from the path but ignores one it cannot parse
    # ("/O" for "/0" would silently be database 0): check it here.
    path = urlsplit(spec).path
    if not _DB_PATH.match(path):
        raise DatabaseError(
            f"database {shown!r}: {path!r} is not a database number; "
            "use redis://HOST:PORT/N with N a number (0 when omitted)")
    try:
        client = redis.Redis.from_url(
            spec, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=SOCKET_TIMEOUT_S)
    except ValueError as err:  # a port that is no number, an unknown option in the query
        raise DatabaseError(f"database {shown!r} is not a valid Redis URL ({err}); "
                            "use redis://HOST:PORT/N") from None
    try:
        client.ping()
    except redis.RedisError as err:  # refused, unknown host, timeout, wrong password, TLS
        client.close()
        raise DatabaseError(
            f"database {shown!r}: cannot reach the Redis server ({err}); check the host, port "
            "and password, and that redis-server runs there and accepts connections from "
            "this machine") from None
    return RedisExampleDatabase(client, expire_after=EXPIRE_AFTER, key_prefix=KEY_PREFIX,
                                listener_channel=LISTENER_CHANNEL)


def _redacted(spec: str) -> str:
    """SPEC with the password of its URL replaced, so that errors never print it into a log."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@:]*):[^/@]*@", r"\1:***@", spec)
