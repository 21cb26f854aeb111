"""The corpus store: file format, identity, dedup, atomic and concurrent writes, validation.

No model is needed: verdicts are built by hand from fuzz.verdict records.
"""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import fuzz
from fuzz import corpus as corpus_module
from fuzz.corpus import (
    SCHEMA_VERSION,
    Case,
    Corpus,
    CorpusError,
    case_id,
    load_case,
    short_label,
    signature,
)
from fuzz.corpus import store as corpus_store
from fuzz.verdict import NonFinite, Verdict

FINDER = {
    "seed": 1234,
    "strategy": "numbers-and-jargon",
    "date": "2025-01-31T02:00:00+00:00",
    "tool_version": fuzz.__version__,
    "torch_version": "2.13.0",
    "device": "cpu",
}
BOUNDS = {"max_new_tokens": 8, "max_prompt_tokens": 64}
PROCESS_TIMEOUT_S = 60  # a hang guard, not a performance assertion


def make_verdict(
    prompt: str = "the self-attention is important for transformer because",
    *,
    policy: str = "float16",
    add_bos: bool = True,
    layer: int = 5,
    site: str = "residual_mlp",
    position: int = 3,
) -> Verdict:
    ids = ([2] if add_bos else []) + [100 + i for i in range(max(1, len(prompt.split())))]
    nonfinite = NonFinite(step=2, layer=layer, site=site, position=position,
                          token_id=ids[min(position, len(ids) - 1)], kind="inf",
                          channel=17, terms=(61000.0, 9000.0))
    table = {"embedding": {"embed": 25.5}, "5": {"residual_mlp": float("inf"), "mlp_out": 3e4}}
    return Verdict(prompt=prompt, prompt_ids=ids, add_bos=add_bos, policy=policy, finite=False,
                   first_nonfinite=nonfinite, max_abs=table, content_max_abs=table)


MARGIN = {"limit": 65504.0, "unrounded": 70000.0, "ratio": 70000.0 / 65504.0,
          "float32": 69000.0, "float32_ratio": 69000.0 / 65504.0}
ROBUSTNESS = {"robust": True, "reason": "", "margin": 70000.0 / 65504.0,
              "variations": [{"variation": "alone, 1 thread, cpu", "status": "nonfinite",
                              "where": "step 2 layer 5 residual_mlp", "margin": 1.0686}]}


def make_case(prompt: str = "the self-attention is important for transformer because",
              *, model: str = "tiny", fingerprint: str = "sha256:abc123", note: str = "",
              **verdict_kw: Any) -> Case:
    return Case.from_verdict(make_verdict(prompt, **verdict_kw), model=model,
                             fingerprint=fingerprint, bounds=BOUNDS, finder=FINDER,
                             safe_policies=["float32", "bfloat16"], note=note, margin=MARGIN,
                             robustness=ROBUSTNESS)


def json_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.json"))


# --------------------------------------------------------------------------- format and identity


def test_round_trip_through_the_file(tmp_path: Path) -> None:
    case = make_case("π ≈ 3.14159 and 7 billion parameters")
    result = Corpus(tmp_path).save(case)
    assert result.status == "saved"
    assert result.path == tmp_path / "tiny" / f"{case.case_id}.json"
    loaded = load_case(result.path)
    assert loaded == case
    assert loaded.max_abs["5"]["residual_mlp"] == float("inf")
    assert loaded.first_nonfinite.terms == (61000.0, 9000.0)
    [entry] = Corpus(tmp_path).cases()
    assert entry.path == result.path and entry.case == case and entry.case_id == case.case_id


def test_file_is_strict_sorted_utf8_json(tmp_path: Path) -> None:
    case = make_case("π ≈ 3.14159")
    path = Corpus(tmp_path).save(case).path
    raw = path.read_bytes()
    text = raw.decode("utf-8")

    def refuse(name: str) -> None:
        raise AssertionError(f"non-strict JSON constant {name}")

    doc = json.loads(text, parse_constant=refuse)
    assert text.endswith("}\n")
    assert text == json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    assert "π ≈ 3.14159".encode() in raw  # stored as UTF-8, not \u escapes
    assert doc["max_abs"]["5"]["residual_mlp"] == "inf"
    assert doc["schema"] == SCHEMA_VERSION
    assert doc["first_nonfinite"]["kind"] == "inf"
    assert set(doc["finder"]) == set(FINDER)
    assert doc["bounds"] == BOUNDS


def test_signature_buckets_bos_and_content() -> None:
    at_bos = make_case(position=0, add_bos=True)
    at_first_content = make_case(position=0, add_bos=False)
    later = make_case(position=3)
    assert signature(at_bos) == ("sha256:abc123", "float16", True, 5, "residual_mlp", "bos")
    assert signature(at_first_content)[-1] == "content"
    assert signature(later)[-1] == "content"
    # every prompt that fails at the BOS sink is one bucket
    assert signature(make_case("other prompt", position=0)) == signature(at_bos)


def test_case_id_depends_on_signature_and_prompt_only() -> None:
    case = make_case("prompt A")
    assert re.fullmatch(r"[0-9a-f]{16}", case_id(case))
    assert case_id(make_case("prompt A", note="another note")) == case_id(case)
    assert case_id(make_case("prompt B")) != case_id(case)
    assert case_id(make_case("prompt A", policy="bfloat16")) != case_id(case)
    assert case_id(make_case("prompt A", site="attn_out")) != case_id(case)
    assert case_id(make_case("prompt A", fingerprint="sha256:def456")) != case_id(case)


def test_two_models_of_one_name_are_two_buckets(tmp_path: Path) -> None:
    # Two different model.gguf files get the same name (the file stem) but their own buckets.
    store = Corpus(tmp_path)
    assert store.save(make_case("prompt A", model="model")).status == "saved"
    other = make_case("prompt B", model="model", fingerprint="sha256:def456")
    assert other.signature != make_case("prompt A", model="model").signature
    assert store.save(other).status == "saved"
    assert len(store.cases("model")) == 2


def test_short_label_is_readable_and_ascii() -> None:
    case = make_case("Hello, wörld! 7 billion params and more text")
    label = short_label(case)
    assert label == f"tiny-float16-bos-Hello_w_rld_7_billion-{case.case_id[:8]}"
    assert short_label(make_case("   ", add_bos=False)).startswith("tiny-float16-nobos-empty-")


def test_from_verdict_refuses_a_finite_verdict() -> None:
    verdict = make_verdict()
    verdict.finite, verdict.first_nonfinite = True, None
    with pytest.raises(ValueError, match="only failing verdicts"):
        Case.from_verdict(verdict, model="tiny", fingerprint="x", bounds=BOUNDS, finder=FINDER)


def test_save_refuses_what_it_could_not_load(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model name '../evil'"):
        Corpus(tmp_path).save(make_case(model="../evil"))
    bad_bounds = make_case()
    bad_bounds.bounds = {"max_new_tokens": 8}
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        Corpus(tmp_path).save(bad_bounds)
    float_ids = make_case()
    float_ids.prompt_ids = [2, 3.0]
    with pytest.raises(ValueError, match=r"prompt_ids\[1\] = 3.0 is not an integer token id"):
        Corpus(tmp_path).save(float_ids)
    assert not list(tmp_path.rglob("*.json"))


def test_finder_info_fills_versions_and_date() -> None:
    info = corpus_module.finder_info(seed=7, strategy="s", device="cpu")
    import torch

    assert info["tool_version"] == fuzz.__version__
    assert info["torch_version"] == str(torch.__version__)
    assert set(info) == set(FINDER)
    assert info["date"].endswith("+00:00")


# --------------------------------------------------------------------------- dedup


def test_same_case_twice_gives_one_file_and_never_overwrites(tmp_path: Path) -> None:
    store = Corpus(tmp_path)
    first = store.save(make_case(note="first"))
    second = store.save(make_case(note="second"))
    assert (first.status, second.status) == ("saved", "duplicate-file")
    assert second.path == first.path
    assert json_files(tmp_path / "tiny") == [first.path]
    assert load_case(first.path).note == "first"
    forced = store.save(make_case(note="forced"), force=True)
    assert forced.status == "duplicate-file"
    assert load_case(first.path).note == "first"


def test_known_signature_is_not_saved_again(tmp_path: Path) -> None:
    store = Corpus(tmp_path)
    first = store.save(make_case("prompt A"))
    second = store.save(make_case("prompt B, same failure"))
    assert second.status == "known-signature"
    assert second.existing == (first.path,)
    assert json_files(tmp_path / "tiny") == [first.path]
    assert store.signatures("tiny") == {make_case("prompt A").signature}


def test_force_saves_a_second_prompt_for_a_known_signature(tmp_path: Path) -> None:
    store = Corpus(tmp_path)
    store.save(make_case("prompt A"))
    forced = store.save(make_case("prompt B, same failure"), force=True)
    assert forced.status == "saved"
    assert len(json_files(tmp_path / "tiny")) == 2
    assert store.signatures("tiny") == {make_case().signature}


def test_new_signature_of_the_same_prompt_is_saved(tmp_path: Path) -> None:
    store = Corpus(tmp_path)
    assert store.save(make_case("prompt A")).status == "saved"
    assert store.save(make_case("prompt A", layer=6)).status == "saved"
    assert store.save(make_case("prompt A", model="gemma3-270m")).status == "saved"
    assert len(store.cases("tiny")) == 2 and len(store.cases()) == 3


def test_save_without_hard_links_falls_back_to_exclusive_create(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: Any, dst: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    store = Corpus(tmp_path)
    case = make_case()
    saved = store.save(case)
    assert saved.status == "saved"
    assert store.save(make_case(note="again")).status == "duplicate-file"
    assert load_case(saved.path) == case
    assert store.orphans() == []


# --------------------------------------------------------------------------- concurrency and kills


def _race_to_save(root: str, prompt: str, barrier: Any, results: Any) -> None:
    """Child: widen the check-then-write window, so only the lock can keep one file."""
    publish = corpus_store.write_atomic  # the name Corpus.save publishes through

    def slow_publish(*args: Any, **kwargs: Any) -> bool:
        time.sleep(0.3)  # without the directory lock every racer would pass the check first
        return publish(*args, **kwargs)

    corpus_store.write_atomic = slow_publish  # type: ignore[assignment]
    barrier.wait(timeout=PROCESS_TIMEOUT_S)
    results.put(Corpus(Path(root)).save(make_case(prompt)).status)


@pytest.mark.parametrize("same_prompt", [True, False], ids=["same-case", "same-signature"])
def test_racing_processes_store_exactly_one_file(tmp_path: Path, same_prompt: bool) -> None:
    ctx = multiprocessing.get_context("fork")
    racers = 4
    barrier, results = ctx.Barrier(racers), ctx.Queue()
    prompts = ["one prompt"] * racers if same_prompt else [f"prompt {i}" for i in range(racers)]
    procs = [ctx.Process(target=_race_to_save, args=(str(tmp_path), p, barrier, results))
             for p in prompts]
    for proc in procs:
        proc.start()
    statuses = sorted(results.get(timeout=PROCESS_TIMEOUT_S) for _ in procs)
    for proc in procs:
        proc.join(timeout=PROCESS_TIMEOUT_S)
        assert proc.exitcode == 0
    expected_loser = "duplicate-file" if same_prompt else "known-signature"
    assert statuses == sorted(["saved"] + [expected_loser] * (racers - 1))
    assert len(json_files(tmp_path / "tiny")) == 1
    assert Corpus(tmp_path).orphans() == []


def _write_then_hang(root: str, ready: Any, stage: str) -> None:
    """Child: stop for good in the middle of a save, to be SIGKILLed there."""
    real_write = os.write

    def hang(*_: Any) -> None:
        ready.set()
        time.sleep(3600)

    def half_write_then_hang(fd: int, data: Any) -> int:
        real_write(fd, bytes(data[: len(data) // 2]))
        hang()
        return 0

    if stage == "write":
        os.write = half_write_then_hang  # type: ignore[assignment]
    else:
        os.fsync = hang  # type: ignore[assignment]
    Corpus(Path(root)).save(make_case("killed writer", note="x" * 200_000))


@pytest.mark.parametrize("stage", ["write", "fsync"])
def test_killed_writer_leaves_no_partial_case(tmp_path: Path, stage: str) -> None:
    store = Corpus(tmp_path)
    survivor = store.save(make_case("earlier case", layer=1))
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_write_then_hang, args=(str(tmp_path), ready, stage))
    child.start()
    assert ready.wait(timeout=PROCESS_TIMEOUT_S), "the child never reached the write"
    os.kill(child.pid, signal.SIGKILL)
    child.join(timeout=PROCESS_TIMEOUT_S)
    assert child.exitcode == -signal.SIGKILL

    assert json_files(tmp_path / "tiny") == [survivor.path]
    [orphan] = store.orphans()
    assert orphan.name.startswith(".") and orphan.name.endswith(".tmp")
    assert orphan.stat().st_size > 0
    assert [lc.path for lc in store.cases()] == [survivor.path]
    assert store.scan().errors == []
    # the killed finding can still be saved; the orphan does not block it
    assert store.save(make_case("killed writer")).status == "saved"


def test_hand_left_partial_tmp_file_is_ignored(tmp_path: Path) -> None:
    store = Corpus(tmp_path)
    saved = store.save(make_case()).path
    (tmp_path / "tiny" / f".{saved.stem}.999.ab12cd34.tmp").write_text('{"schema": 1, "pro')
    assert [lc.path for lc in store.cases("tiny")] == [saved]


# --------------------------------------------------------------------------- malformed files


Edit = Callable[[dict[str, Any]], Any]  # a valid document -> the content to write instead


def _without(key: str) -> Edit:
    return lambda d: {k: v for k, v in d.items() if k != key}


def _set(key: str, value: Any) -> Edit:
    return lambda d: {**d, key: value}


def _set_in(outer: str, key: str, value: Any) -> Edit:
    return lambda d: {**d, outer: {**d[outer], key: value}}


def _drop_in(outer: str, key: str) -> Edit:
    return lambda d: {**d, outer: {k: v for k, v in d[outer].items() if k != key}}


# (edit of a valid document, snippets the message must contain besides the path)
MALFORMED: dict[str, tuple[Edit, list[str]]] = {
    "missing-field": (_without("policy"), ["missing field 'policy'", "python -m fuzz add"]),
    "missing-schema": (_without("schema"), ["missing field 'schema'", '"schema": 2']),
    "newer-schema": (_set("schema", 3), ["unknown schema version 3", "reads schema 2",
                                         "upgrade gemma-fuzz"]),
    "schema-1": (_set("schema", 1), ["schema 1", "python -m fuzz add --from-case"]),
    "margin-not-number": (_set_in("margin", "unrounded", "big"),
                          ["field 'margin.unrounded' must be a number or null", '"big"']),
    "robustness-key-missing": (_drop_in("robustness", "variations"),
                               ["field 'robustness' lacks 'variations'"]),
    "older-schema": (_set("schema", 0), ["unknown schema version 0", "python -m fuzz add"]),
    "unknown-field": (_set("promt", "typo"), ["unknown field 'promt'", "remove it"]),
    "bool-as-string": (_set("add_bos", "yes"), ["field 'add_bos' must be true or false",
                                                'got string "yes"']),
    "ids-not-ints": (_set("prompt_ids", [2, 3.5]), ["field 'prompt_ids[1]' must be an integer",
                                                    "got number 3.5"]),
    "bounds-key-missing": (_drop_in("bounds", "max_prompt_tokens"),
                           ["field 'bounds' lacks 'max_prompt_tokens'"]),
    "bounds-wrong-type": (_set_in("bounds", "max_new_tokens", "8"),
                          ["field 'bounds.max_new_tokens' must be an integer >= 0",
                           'got string "8"']),
    "bad-kind": (_set_in("first_nonfinite", "kind", "overflow"),
                 ["field 'first_nonfinite.kind' must be \"nan\" or \"inf\"", '"overflow"']),
    "bad-max-abs": (_set("max_abs", {"5": {"residual_mlp": "big"}}),
                    ["field 'max_abs.5.residual_mlp' must be a number", '"big"']),
    "bad-date": (_set_in("finder", "date", "last night"),
                 ["field 'finder.date' must be an ISO 8601 date", '"last night"']),
    "finder-key-missing": (_drop_in("finder", "torch_version"),
                           ["field 'finder' lacks 'torch_version'"]),
    "not-an-object": (lambda d: [d], ["must hold one JSON object, found array"]),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_file_is_named_and_explained(tmp_path: Path, name: str) -> None:
    edit, snippets = MALFORMED[name]
    path = tmp_path / "tiny" / f"{make_case().case_id}.json"
    path.parent.mkdir(parents=True)
    content = edit(make_case().to_document())
    path.write_text(json.dumps(content, indent=2, sort_keys=True), encoding="utf-8")
    with pytest.raises(CorpusError) as info:
        Corpus(tmp_path).cases()
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert info.value.path == path
    for snippet in snippets:
        assert snippet in message


def _write_case_file(root: Path, text: bytes, name: str = "0123456789abcdef.json") -> Path:
    path = root / "tiny" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text)
    return path


@pytest.mark.parametrize(
    "text, snippets",
    [
        (b'{"schema": 1, "prompt": ', ["not valid JSON", "line 1", "python -m fuzz add"]),
        (b"", ["not valid JSON"]),
        (b'{"schema": 1, "x": NaN}', ["not valid JSON", "bare NaN is not strict JSON"]),
        (b'{"prompt": "\xff\xfe"}', ["not UTF-8 text (bad byte at offset 12)"]),
    ],
    ids=["truncated", "empty", "bare-nan", "not-utf8"],
)
def test_unparsable_file_is_named_and_explained(
    tmp_path: Path, text: bytes, snippets: list[str]
) -> None:
    path = _write_case_file(tmp_path, text)
    with pytest.raises(CorpusError) as info:
        load_case(path)
    assert str(info.value).startswith(f"{path}: ")
    for snippet in snippets:
        assert snippet in str(info.value)


def test_hand_edited_prompt_no_longer_matches_its_name(tmp_path: Path) -> None:
    store = Corpus(tmp_path)
    path = store.save(make_case("7 billion parameters")).path
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["prompt"] = "seven billion parameters"
    path.write_text(json.dumps(doc, sort_keys=True, indent=2), encoding="utf-8")
    new_id = make_case("seven billion parameters").case_id
    with pytest.raises(CorpusError) as info:
        store.cases()
    message = str(info.value)
    assert message.startswith(f"{path}: file name does not match the case")
    assert f"rename it to {new_id}.json" in message
    # following the advice fixes it
    path.rename(path.with_name(f"{new_id}.json"))
    assert [lc.case.prompt for lc in store.cases()] == ["seven billion parameters"]


def test_case_in_the_wrong_model_directory(tmp_path: Path) -> None:
    store = Corpus(tmp_path)
    path = store.save(make_case()).path
    moved = tmp_path / "gemma3-270m" / path.name
    moved.parent.mkdir()
    path.rename(moved)
    with pytest.raises(CorpusError) as info:
        store.cases()
    assert str(info.value).startswith(f"{moved}: case of model 'tiny' is stored under")
    assert f"move it to {tmp_path / 'tiny'}/" in str(info.value)


def test_scan_returns_good_cases_and_every_error(tmp_path: Path) -> None:
    store = Corpus(tmp_path)
    good = store.save(make_case()).path
    broken = _write_case_file(tmp_path, b"{not json")
    stray = tmp_path / "ffffffffffffffff.json"
    stray.write_text("{}")
    result = store.scan()
    assert [lc.path for lc in result.cases] == [good]
    assert sorted(e.path for e in result.errors) == sorted([broken, stray])
    with pytest.raises(CorpusError):
        store.cases()
    with pytest.raises(CorpusError):  # dedup cannot be trusted over a broken file
        store.save(make_case("another prompt"))


def test_empty_or_missing_corpus_has_no_cases(tmp_path: Path) -> None:
    assert Corpus(tmp_path / "absent").cases() == []
    assert Corpus(tmp_path).cases("tiny") == []
    assert Corpus(tmp_path).signatures("tiny") == set()
