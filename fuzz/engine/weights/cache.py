"""The dequantized GGUF cache: `load_gguf` is `read_gguf` behind a float32 safetensors file.

A cold read of the 270M Q4_K_M file takes ~30 s (see `gguf_file`). `load_gguf` caches the float32
state (1.08 GB) as a safetensors file keyed by the GGUF's sha256: a cached load takes ~0.5-0.9 s,
most of it hashing the 253 MB GGUF. Files are published with `fuzz.atomic.write_atomic`, and cold
builds of one file are serialised across processes (pytest-xdist workers) by a lock file.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from fuzz.atomic import temp_glob, write_atomic
from fuzz.engine.config import GemmaConfig
from fuzz.engine.weights.gguf_file import GGUFModel, file_sha256, read_gguf
from fuzz.engine.weights.strict import check_state_dict

CACHE_ENV = "GEMMA_FUZZ_CACHE"
# Bump when the cache layout or the GGUF mapping changes: older cache files are then rebuilt.
CACHE_FORMAT = "gemma-fuzz-gguf-cache-1"


def default_cache_dir() -> Path:
    """$GEMMA_FUZZ_CACHE, or ~/.cache/gemma-fuzz."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gemma-fuzz")


def _cache_file(cache_dir: Path, sha256: str) -> Path:
    return cache_dir / f"{sha256}.safetensors"


def _read_cache(file: Path, sha256: str, path: Path) -> GGUFModel | None:
    """The cached model, or None when the file is absent, stale or corrupt (then it is rebuilt)."""
    from safetensors import safe_open
    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != CACHE_FORMAT or header.get("sha256") != sha256:
                return None
            config = GemmaConfig.from_dict(json.loads(header["config"]), source=str(file))
            metadata = json.loads(header["gguf_metadata"])
            state = {key: f.get_tensor(key) for key in f.keys()}
        state = check_state_dict(state, config, source=str(file))
    except Exception as err:  # any failure means the cache cannot be trusted: rebuild it
        warnings.warn(f"ignoring unreadable GGUF cache {file} ({type(err).__name__}: {err}); "
                      f"rebuilding it", stacklevel=3)
        return None
    return GGUFModel(config=config, state=state, metadata=metadata, sha256=sha256, path=path)


def _write_cache(model: GGUFModel, file: Path) -> None:
    """Atomically (write_atomic): readers see the old file or the whole new one, never a partial
    file, even with concurrent pytest-xdist workers or a killed process."""
    from safetensors.torch import save_file
    header = {"format": CACHE_FORMAT, "sha256": model.sha256,
              "config": json.dumps(model.config.to_dict(), sort_keys=True),
              "gguf_metadata": json.dumps(model.metadata)}
    # save_file wants a path, so write_atomic hands it the temp file to fill.
    write_atomic(file, lambda tmp: save_file(model.state, str(tmp), metadata=header))


def _remove_stale_temp_files(file: Path) -> None:
    """Temp files of this cache entry left by a killed build (1 GB each). Called under the build
    lock, so no live process is writing one (without fcntl a concurrent build's file may go: its
    publishing then fails, and that process only warns)."""
    # Only this file's temp names (`.<name>.<pid>.<rand>.tmp`, fuzz.atomic.temp_name): the
    # tokenizer cache beside it is written outside the build lock.
    for stale in file.parent.glob(temp_glob(file)):
        with contextlib.suppress(OSError):
            stale.unlink()


@contextlib.contextmanager
def _build_lock(lock_path: Path) -> Iterator[None]:
    """Serialises cold builds of one file across processes, so parallel workers dequantize it
    once instead of each spending ~20 s and 1 GiB; the OS drops the lock if a holder dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: builds may run twice, the atomic replace keeps them safe
        yield
        return
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+b")
    except OSError as err:
        warnings.warn(f"GGUF cache directory {lock_path.parent} is not usable ({err}); "
                      f"loading without the cache lock", stacklevel=4)
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_gguf(path: str | os.PathLike[str],
              cache_dir: str | os.PathLike[str] | None = None) -> GGUFModel:
    """read_gguf through a float32 safetensors cache keyed by the GGUF file's sha256.

    cache_dir defaults to $GEMMA_FUZZ_CACHE or ~/.cache/gemma-fuzz. The cache file is
    `<sha256>.safetensors` whose header also holds the config and the GGUF metadata. A cache that
    cannot be written only costs speed (a warning); one that cannot be read is rebuilt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist (or is not a file)")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    sha256 = file_sha256(path)
    file = _cache_file(cache, sha256)
    cached = _read_cache(file, sha256, path)
    if cached is not None:
        return cached
    with _build_lock(cache / f".{sha256}.lock"):
        cached = _read_cache(file, sha256, path)  # another process may have built it meanwhile
        if cached is not None:
            return cached
        _remove_stale_temp_files(file)
        model = read_gguf(path, sha256=sha256)
        try:
            _write_cache(model, file)
        except OSError as err:
            warnings.warn(f"could not write the GGUF cache {file} ({err}); the next load will "
                          f"dequantize again", stacklevel=2)
        return model
