"""`fuzz advise --plan` (fuzz.advise.plan): the fewest layers kept in float32, found by greedy
growth and pruning against the checks, written as a plan file every command accepts."""
from __future__ import annotations

import json

import pytest

from fuzz.advise.plan import (
    Check,
    evaluate,
    file_checks,
    find_plan,
    plan_text,
    prompt_checks,
    write_plan,
)
from fuzz.engine.zoo import load_model
from fuzz.precision import POLICIES, get_policy, plan_policy
from fuzz.session import Session
from fuzz.verdict import Bounds

BOUNDS = Bounds(max_new_tokens=4)


@pytest.fixture(scope="module")
def planted() -> Session:
    # tiny-planted: "7" with BOS overflows float16 in layer 2's residual stream (the planted
    # channel), which comes back below the limit after layer 3
    return Session(load_model("tiny-planted"), bounds=BOUNDS, batch_size=4)


@pytest.fixture(scope="module")
def planted_plan(planted: Session):
    return find_plan(planted, prompt_checks(planted, ["7", "hello"], "seed 0"))


def test_the_plan_is_the_fewest_layers_that_keep_every_check_within_headroom(
        planted: Session, planted_plan) -> None:
    checks = prompt_checks(planted, ["7", "hello"], "seed 0")
    assert [c.spec.add_bos for c in checks] == [True, False, True, False]
    failures, _ = evaluate(planted, POLICIES["float16"], checks, 1.02)
    assert failures  # plain float16 fails: there is something to plan
    assert planted_plan.layers == [2, 3]
    failures, least = evaluate(planted, planted_plan.policy, checks, 1.02)
    assert not failures and least >= 1.02 and least == planted_plan.least_headroom
    for layer in planted_plan.layers:  # 1-minimal: no single layer can go
        rest = set(planted_plan.layers) - {layer}
        policy = plan_policy(rest) if rest else POLICIES["float16"]
        assert evaluate(planted, policy, checks, 1.02)[0]
    # grown, pruned, and checked once more on the final plan
    assert planted_plan.steps[0]["layers"] == [] and planted_plan.steps[-1]["layers"] == [2, 3]
    assert planted_plan.evaluations == len(planted_plan.steps)
    assert "layers 2, 3 (2 of 4" in plan_text(planted_plan)


def test_each_trial_plans_model_is_released_after_its_evaluation(planted: Session) -> None:
    # each trial plan is its own policy (~0.5 GB of model each on Gemma 3 270M); the zoo's
    # LoadedModel is shared with other tests, so only what this search added counts
    before = set(planted.model._engines)
    find_plan(planted, prompt_checks(planted, ["7", "hello"], "seed 0"))
    assert not [key for key in planted.model._engines
                if key not in before and "fp32-layers" in key[0]]


def test_a_model_that_never_comes_back_below_the_limit_needs_every_layer_after_the_overflow():
    session = Session(load_model("tiny-digit-run-8"), bounds=BOUNDS, batch_size=4)
    plan = find_plan(session, prompt_checks(session, ["00000000", "hello 12"], "seed 0"))
    assert plan.layers == [0, 1, 2, 3]


def test_nothing_to_plan_when_float16_passes() -> None:
    session = Session(load_model("tiny-planted"), bounds=BOUNDS, batch_size=4)
    plan = find_plan(session, prompt_checks(session, ["hello"], "seed 0"))
    assert plan.layers == [] and plan.evaluations == 1
    assert "no layer needs float32" in plan_text(plan)


def test_a_failure_no_plan_can_fix_is_named(planted: Session) -> None:
    # headroom 1e6 asks for what float16 matmuls cannot give whatever the residual stream's dtype
    plan = find_plan(planted, prompt_checks(planted, ["hello"], "seed 0"), min_headroom=1e6)
    assert plan.layers is None and plan.policy is None
    assert "stays float16 in every plan" in plan.why_none
    assert "sampled seed 0 (BOS)" in plan.why_none
    assert "no plan:" in plan_text(plan)


def test_the_plan_file_is_a_policy_every_command_accepts_and_is_never_overwritten(
        planted_plan, tmp_path) -> None:
    path = write_plan(planted_plan, tmp_path / "plans" / "plan.json")
    doc = json.loads(path.read_text())
    assert doc["fp32_layers"] == [2, 3] and doc["policy"] == "float16-fp32-layers:2+3"
    assert doc["model_fingerprint"] == planted_plan.fingerprint and doc["checked"] == {
        "sampled": 4}
    assert get_policy(f"plan:{path}") == planted_plan.policy
    with pytest.raises(FileExistsError, match="never overwritten"):
        write_plan(planted_plan, path)


def test_prompt_files_are_checked_in_both_bos_modes_and_chats_once(planted: Session,
                                                                    tmp_path) -> None:
    text = tmp_path / "prompts.txt"
    text.write_text("7\nhello\n")
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "7"}]}) + "\n")
    checks = file_checks(planted, [str(text), str(chats)])
    assert [(c.source, c.spec.add_bos, c.spec.chat) for c in checks] == [
        (f"{text}:1", True, False), (f"{text}:1", False, False),
        (f"{text}:2", True, False), (f"{text}:2", False, False), (f"{chats}:1", True, True)]
    assert all(isinstance(c, Check) and c.bounds == BOUNDS for c in checks)
    plan = find_plan(planted, checks)
    assert plan.checked == {"prompts": 5} and plan.layers == [2, 3]


def test_advise_plan_writes_the_plan_and_measures_it_beside_the_other_policies(
        tmp_path, monkeypatch, capsys) -> None:
    from fuzz.cli import main

    monkeypatch.chdir(tmp_path)  # no ./corpus here: advise runs without one
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("7\n")
    common = ["advise", "--model", "tiny-planted", "--sample", "2", "--text-chunks", "2",
              "--text-tokens", "16", "--max-new-tokens", "3"]
    assert main([*common, "--plan", "--prompts", str(prompts), "--plan-out", "p.json",
                 "--report", "rep"]) == 0
    out = capsys.readouterr().out
    assert "plan: residual stream in float32 at layers 2, 3" in out
    assert "use it as --policy plan:p.json" in out
    assert json.loads((tmp_path / "p.json").read_text())["checked"]["prompts"] == 2
    measured = json.loads((tmp_path / "rep" / "advise.json").read_text())
    assert "float16-fp32-layers:2+3" in [p["policy"] for p in measured["policies"]]
    # never overwritten; the plan's options without --plan are an error, not ignored
    assert main([*common, "--plan", "--plan-out", "p.json"]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert main([*common, "--prompts", str(prompts)]) == 2
    assert "apply to --plan only" in capsys.readouterr().err
    assert main([*common, "--plan", "--min-headroom", "0.5"]) == 2
    assert "--min-headroom 0.5" in capsys.readouterr().err


def test_advise_json_prints_one_document_with_the_contract_keys_and_the_plan(
        tmp_path, monkeypatch, capsys) -> None:
    from fuzz.cli import main

    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("7\n")
    assert main(["advise", "--model", "tiny-planted", "--sample", "2", "--text-chunks", "2",
                 "--text-tokens", "16", "--max-new-tokens", "3", "--json", "--plan",
                 "--prompts", str(prompts)]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)  # stdout is the JSON document alone
    assert "plan: residual stream in float32" in captured.err
    assert doc["recommended"] and doc["plan"]["fp32_layers"] == [2, 3]
    assert (tmp_path / "plan-tiny-planted.json").exists()  # the default --plan-out
    for row in doc["policies"]:
        assert {"finite_everywhere", "kld_mean", "kld_ci95", "top1_agreement",
                "prompts_per_s"} <= set(row)
        assert len(row["kld_ci95"]) == 2
    f32 = next(r for r in doc["policies"] if r["policy"] == "float32")
    assert f32["kld_mean"] == 0.0 and f32["top1_agreement"] == 1.0


def test_check_and_screen_take_a_plan_file_as_their_policy(planted_plan, tmp_path,
                                                            capsys) -> None:
    from fuzz.cli import main

    path = write_plan(planted_plan, tmp_path / "plan.json")
    common = ["--model", "tiny-planted", "--max-new-tokens", "3"]
    assert main(["check", *common, "--policy", "float16", "--prompt", "7"]) == 1
    capsys.readouterr()
    assert main(["check", *common, "--policy", f"plan:{path}", "--prompt", "7", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["finite"] is True
    prompts = tmp_path / "p.txt"
    prompts.write_text("7\nhello\n")
    out = tmp_path / "results.jsonl"
    assert main(["screen", *common, "--quiet", "--prompts", str(prompts), "--policies",
                 f"float16,plan:{path}", "--out", str(out)]) == 0  # the plan, safe, stayed finite
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_policy = {(r["policy"], r["prompt_index"]): r["finite"] for r in rows}
    # the results file records the plan's canonical name, not the file's path
    assert by_policy == {("float16", 0): False, ("float16", 1): True,
                         ("float16-fp32-layers:2+3", 0): True,
                         ("float16-fp32-layers:2+3", 1): True}
