"""fuzz.search.database against a real redis-server: several machines sharing one example
database."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import unittest
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase, ExampleDatabase

from fuzz.search.database import (
    EXPIRE_AFTER,
    KEY_PREFIX,
    REDIS_INSTALL_HINT,
    DatabaseError,
    open_database,
)

REDIS_SERVER = shutil.which("redis-server")
needs_redis_server = pytest.mark.skipif(
    REDIS_SERVER is None,
    reason="needs the redis-server binary: apt-get install redis-server")
START_TIMEOUT_S = 10.0


def free_port() -> int:
    """A TCP port nothing listens on right now (the kernel's pick for port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_ping(url: str, server: subprocess.Popen, log: Path) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"redis-server exited with {server.returncode}:\n"
                                   f"{log.read_text(errors='replace')}")
            try:
                if client.ping():
                    return
            except redis.ConnectionError as err:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer PING on {url} within "
                                       f"{START_TIMEOUT_S}s:\n{log.read_text(errors='replace')}"
                                       ) from err
                time.sleep(0.02)
    finally:
        client.close()


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh, empty redis-server of this test's own, stopped afterwards.

    No persistence (--save '' --appendonly no) and its working directory in tmp_path, so that it
    writes nothing outside the test; bound to 127.0.0.1 on a free port, so that xdist workers and
    a system Redis on 6379 never meet it."""
    if REDIS_SERVER is None:
        pytest.skip("needs the redis-server binary: apt-get install redis-server")
    pytest.importorskip("redis", reason=f"needs the redis package: {REDIS_INSTALL_HINT}")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    log = tmp_path / "redis-server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(tmp_path)],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for_ping(url, server, log)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_none_and_empty_mean_no_database() -> None:
    assert open_database(None) is None
    assert open_database("") is None


def test_a_path_is_a_directory_database_created_if_missing(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "fuzz-db"
    db = open_database(str(path))
    assert isinstance(db, DirectoryBasedExampleDatabase)
    assert path.is_dir()
    db.save(b"key", b"value")
    assert list(open_database(str(path)).fetch(b"key")) == [b"value"]


def test_a_path_that_cannot_be_a_directory_names_it(tmp_path: Path) -> None:
    taken = tmp_path / "a-file"
    taken.write_text("not a directory")
    with pytest.raises(DatabaseError, match="a-file.*cannot be created"):
        open_database(str(taken))


@pytest.mark.parametrize("spec", ["http://127.0.0.1:6379/0", "redis:/127.0.0.1:6379/0"])
def test_a_mistyped_url_is_refused_not_made_a_directory(
        spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatabaseError, match="neither a Redis URL nor a directory") as err:
        open_database(spec)
    assert spec in str(err.value) and "redis://HOST:PORT/N" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_redis_package_gives_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import redis` raise ImportError, as if it were not installed;
    # hypothesis.extra.redis is dropped so that it is imported (and fails) again.
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.delitem(sys.modules, "hypothesis.extra.redis", raising=False)
    with pytest.raises(DatabaseError, match="gemma-fuzz\\[redis\\]") as err:
        open_database("redis://127.0.0.1:6379/0")
    assert "redis://127.0.0.1:6379/0" in str(err.value)


@needs_redis_server
def test_open_database_on_a_redis_url_is_a_redis_database(redis_url: str) -> None:
    from hypothesis.extra.redis import RedisExampleDatabase

    db = open_database(redis_url)
    assert isinstance(db, RedisExampleDatabase)
    db.save(b"key", b"one")
    db.save(b"key", b"two")
    assert sorted(db.fetch(b"key")) == [b"one", b"two"]
    db.delete(b"key", b"one")
    assert list(db.fetch(b"key")) == [b"two"]
    # Our own key prefix (one Redis, several projects) and time to live, on the server itself.
    assert db.redis.keys(b"*") == [KEY_PREFIX + b"key"]
    ttl = db.redis.ttl(KEY_PREFIX + b"key")
    assert EXPIRE_AFTER - timedelta(minutes=1) < timedelta(seconds=ttl) <= EXPIRE_AFTER


@needs_redis_server
def test_the_database_number_comes_from_the_url_path(redis_url: str) -> None:
    base = redis_url.rsplit("/", 1)[0]
    zero, three = open_database(base + "/0"), open_database(base + "/3")
    assert three.redis.connection_pool.connection_kwargs["db"] == 3
    three.save(b"key", b"in three")
    assert list(zero.fetch(b"key")) == []
    assert list(open_database(base + "/3").fetch(b"key")) == [b"in three"]


@needs_redis_server
def test_two_machines_on_one_url_see_each_others_entries(redis_url: str) -> None:
    machine_a, machine_b = open_database(redis_url), open_database(redis_url)
    assert machine_a.redis is not machine_b.redis  # two clients, two connections
    machine_a.save(b"key", b"from a")
    machine_b.save(b"key", b"from b")
    assert sorted(machine_a.fetch(b"key")) == [b"from a", b"from b"]
    machine_b.move(b"key", b"other", b"from a")
    assert list(machine_a.fetch(b"key")) == [b"from b"]
    assert list(machine_a.fetch(b"other")) == [b"from a"]


def _machine(database: ExampleDatabase, phases: tuple[Phase, ...],
             tried: list[str]) -> Callable[[], None]:
    """One machine's Hypothesis search: prompts of digits and spaces that must not contain a 7
    (the planted trigger's digit), under a fixed database key as fuzz.search.round gives each
    search.

    Not seeded: Hypothesis's @seed sets database=None (hypothesis/core.py, seed()), and without
    the database there would be nothing to share."""

    def prompt_stays_finite(prompt: str) -> None:
        tried.append(prompt)
        assert "7" not in prompt

    prompt_stays_finite._hypothesis_internal_add_digest = b"test/replay"  # type: ignore[attr-defined]
    return settings(database=database, phases=phases, max_examples=500, deadline=None,
                    print_blob=False)(given(st.text(alphabet="0123456789 "))(prompt_stays_finite))


@needs_redis_server
def test_a_failure_found_on_one_machine_is_replayed_first_on_another(redis_url: str) -> None:
    machine_a = open_database(redis_url)
    with pytest.raises(AssertionError):
        _machine(machine_a, tuple(Phase), [])()
    # Machine B, its own connection, and no generation at all: the only way it can fail is by
    # replaying what machine A stored, and the shrunk failure is the first example it runs.
    tried: list[str] = []
    with pytest.raises(AssertionError):
        _machine(open_database(redis_url), (Phase.reuse, Phase.shrink), tried)()
    assert tried[0] == "7"
    # The control: the same replay-only run on an empty database runs nothing (and Hypothesis
    # says so by skipping).
    machine_a.redis.flushdb()
    tried.clear()
    with pytest.raises(unittest.SkipTest, match="run no test cases"):
        _machine(open_database(redis_url), (Phase.reuse, Phase.shrink), tried)()
    assert tried == []


@needs_redis_server
def test_an_unreachable_server_fails_at_open_naming_the_url() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(DatabaseError, match="cannot reach the Redis server") as err:
        open_database(url)
    assert url in str(err.value)


@needs_redis_server
def test_a_wrong_password_fails_at_open_and_is_not_printed(redis_url: str) -> None:
    import redis

    redis.Redis.from_url(redis_url).config_set("requirepass", "right")
    url = redis_url.replace("redis://", "redis://:hunter2@")
    with pytest.raises(DatabaseError, match="cannot reach the Redis server") as err:
        open_database(url)
    assert "hunter2" not in str(err.value)
    assert ":***@127.0.0.1" in str(err.value)


@pytest.mark.parametrize("url, problem", [
    ("redis://127.0.0.1:notaport/0", "not a valid Redis URL"),
    ("redis://127.0.0.1:6379/zero", "'/zero' is not a database number"),
])
def test_a_malformed_url_names_it_and_the_form(url: str, problem: str) -> None:
    pytest.importorskip("redis", reason=f"needs the redis package: {REDIS_INSTALL_HINT}")
    with pytest.raises(DatabaseError, match="redis://HOST:PORT/N") as err:
        open_database(url)
    assert problem in str(err.value)
    assert url in str(err.value)
