"""The reproduction's parts: the arithmetic generator and its splits, the numeric reward, the training curves, and the
whole `score-reproduce` pipeline on the tiny local model."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from experiments.arithmetic import WORDS, facts, make_splits, solve
from experiments.curves import mean_over_seeds, moving_average, revision_series, reward_series
from experiments.transfer import TEMPLATES, transfer_rows
from score_trl.rewards import last_number, numeric_reward


_QUESTION = re.compile(r"What is (\w+) (\+|-|×|plus|minus|times) (\w+)\?")
_OP = {"+": "+", "plus": "+", "-": "-", "minus": "-", "×": "*", "times": "*"}


def parse(question: str) -> tuple[int, str, int]:
    a, op, b = _QUESTION.fullmatch(question).groups()
    number = lambda x: int(x) if x.isdigit() else WORDS.index(x)  # noqa: E731
    return number(a), _OP[op], number(b)


def fact_of(question: str) -> tuple[int, str, int]:
    a, op, b = parse(question)
    return (min(a, b), op, max(a, b)) if op != "-" else (a, op, b)


def test_facts_are_distinct_and_answers_right():
    pool = facts(20)
    assert len(pool) == len(set(pool)) == 231 + 231 + 231  # a <= b for + and x, a >= b for -, operands 0..20
    splits = make_splits(seed=3)
    for rows in splits.values():
        for row in rows:
            a, op, b = parse(row["question"])
            assert int(row["answer"]) == solve(a, op, b) >= 0


def test_splits_are_disjoint_seeded_and_sized():
    splits = make_splits(seed=0, n_test=320, n_validation=120)
    assert (len(splits["test"]), len(splits["validation"])) == (320, 120)
    seen = {name: {fact_of(row["question"]) for row in rows} for name, rows in splits.items()}
    assert not seen["test"] & seen["train"] and not seen["test"] & seen["validation"]
    assert not seen["validation"] & seen["train"]
    assert len(seen["test"]) == 320  # each test fact asked once
    assert len(seen["train"]) == 693 - 320 - 120
    words = [any(w in row["question"] for w in ("plus", "minus", "times")) for row in splits["test"]]
    assert 0.35 < sum(words) / len(words) < 0.65  # both wordings in the test split
    assert make_splits(seed=0) == splits
    assert make_splits(seed=1)["test"] != splits["test"]
    with pytest.raises(ValueError, match="n_test"):
        make_splits(n_test=600, n_validation=100)


def test_two_choices_offer_the_answer_and_one_near_distractor_over_the_same_splits():
    plain, offered = make_splits(seed=0), make_splits(seed=0, two_choices=True)
    assert make_splits(seed=0) == plain  # the plain splits do not depend on whether choices were ever drawn
    for name, rows in offered.items():
        first_is_answer = []
        for row, base in zip(rows, plain[name], strict=True):
            stem, choices = row["question"].split(" Is it ")
            first, second = (int(x) for x in re.fullmatch(r"(\d+) or (\d+)\?", choices).groups())
            assert stem == base["question"] and row["answer"] == base["answer"]
            answer = int(row["answer"])
            distractor = second if first == answer else first
            assert answer in (first, second) and distractor != answer and 1 <= abs(distractor - answer) <= 2
            first_is_answer.append(first == answer)
        assert 0.4 < sum(first_is_answer) / len(first_is_answer) < 0.6, name  # the answer's place is drawn


def test_numeric_reward_reads_the_last_number():
    completions = [
        [{"role": "assistant", "content": text}]
        for text in ("7 + 5 = 12", "The answer is 12.", "12, 13 or 14", "It is 1,000.", "twelve", "12.0")
    ]
    answers = ["12", "12", "12", "1000", "12", "12"]
    assert numeric_reward(completions, answer=answers) == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert numeric_reward(completions[:1], answer=[None]) == [None]
    assert last_number("no digits") is None


def test_reward_series_from_score_and_rloo_logs():
    score = [
        {"step": 1, "turn1/reward": 0.25, "turn2/reward": 0.5},
        {"step": 2, "turn1/reward": 0.5, "turn2/reward": 0.25},
        {"step": 2, "train_runtime": 3.0},
    ]
    series = reward_series(score)
    assert series["turn1"] == [(1, 0.25), (2, 0.5)]
    assert series["delta"] == [(1, 0.25), (2, -0.25)]
    rloo = reward_series([{"step": 1, "reward": 0.75}])
    assert rloo == {"turn1": [(1, 0.75)], "turn2": [], "delta": []}
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_revision_series_and_the_mean_over_seeds():
    history = [
        {"step": 1, "self_correction/text_changed": 0.5, "self_correction/answer_changed": 0.25},
        {"step": 2, "self_correction/text_changed": 0.75, "self_correction/answer_changed": 0.5},
        {"step": 2, "train_runtime": 3.0},
    ]
    series = revision_series(history)
    assert series["text_changed"] == [(1, 0.5), (2, 0.75)] and series["answer_changed"] == [(1, 0.25), (2, 0.5)]
    assert revision_series([{"step": 1, "reward": 0.5}])["text_changed"] == []  # RLOO: no second attempt
    assert mean_over_seeds([[(1, 0.5), (2, 1.0)], [(1, 0.0)]]) == [(1, 0.25), (2, 1.0)]


def test_transfer_set_asks_the_test_facts_in_other_words():
    splits = make_splits(seed=0, n_test=320, n_validation=120)
    rows = transfer_rows(seed=0, n_test=320, n_validation=120)
    assert len(rows) == 320 and transfer_rows(seed=0, limit=160) == rows[:160]
    assert not any(_QUESTION.fullmatch(row["question"]) or "What is" in row["question"] for row in rows)
    assert {row["question"] for row in rows}.isdisjoint(row["question"] for split in splits.values() for row in split)
    # same facts as the test split (answers in the same order: the facts are the test split's, in its fact order)
    from experiments.arithmetic import split_facts_of

    test_facts = split_facts_of(0, 320, 120)["test"]
    assert [row["answer"] for row in rows] == [str(solve(*fact)) for fact in test_facts]
    assert {fact_of(row["question"]) for row in splits["test"]} == set(test_facts)
    # every template is used, and operands appear (as digits or words) in every question
    used = {template for template in (t for ts in TEMPLATES.values() for t in ts)}
    assert len(used) == 18 and len({row["question"].split()[0] for row in rows}) > 8
    for row, (a, _, b) in zip(rows, test_facts, strict=True):
        text = row["question"].lower()
        assert all(str(x) in text or WORDS[x] in text for x in (a, b)), row


REPO = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO / "recipes" / "reproduce"


def flat(setup) -> dict:
    """Every setting of a parsed reproduction recipe in one mapping, to compare two recipes."""
    from dataclasses import asdict

    training = {k: v for k, v in setup.training.to_dict().items() if k not in ("logging_dir",)}
    return asdict(setup.args) | asdict(setup.script) | training | asdict(setup.model)


@pytest.mark.parametrize("recipe", ["smollm2_cpu.yaml", "gpu.yaml", "gemma3_270m_cpu.yaml", "gemma3_270m_plain.yaml"])
def test_reproduction_recipes_parse(recipe):
    from experiments.reproduce import ARMS, parse_args

    setup = parse_args([str(RECIPES_DIR / recipe)])
    args, training = setup.args, setup.training
    arms = ("base", "rloo", "score") if recipe.startswith("gemma3") else ARMS  # the second model's minimum
    assert args.arms[:3] == ["base", "rloo", "score"] and set(args.arms) == set(arms) and len(args.seeds) >= 3
    if "rloo_then_score" in args.arms:
        assert args.arms.index("rloo") < args.arms.index("rloo_then_score")  # the continuation arms start from rloo
    assert (training.alpha, training.beta, training.beta2) == (10.0, 0.01, 0.1)  # the paper's
    assert 0 < training.stage_one_steps < training.max_steps and args.eval_split == "test" and args.n_test >= 300
    assert setup.model.use_peft and setup.model.lora_r == 16 and training.disable_dropout


def test_second_model_recipe_differs_from_smollm2s_only_in_model_temperature_and_folders():
    """Gemma 3 270M gets the same task, splits, budget and SCoRe settings as SmolLM2, so the two are comparable."""
    from experiments.reproduce import parse_args

    smollm2 = flat(parse_args([str(RECIPES_DIR / "smollm2_cpu.yaml")]))
    gemma = flat(parse_args([str(RECIPES_DIR / "gemma3_270m_cpu.yaml")]))
    differing = {key for key in smollm2 if smollm2[key] != gemma[key]}
    assert differing <= {"gguf_file", "chat_template", "temperature", "arms", "results_dir", "work_dir"}, differing
    assert gemma["results_dir"] != smollm2["results_dir"] and gemma["work_dir"] != smollm2["work_dir"]


def test_plain_prompt_recipe_differs_from_the_chat_one_only_in_the_prompt_format_and_folders():
    """The base-model rerun of Gemma 3 270M changes how the turns are written, nothing about the task or training;
    its few-shot prompt is the one the validation probe chose, with the probe's stop rule."""
    from experiments.reproduce import parse_args

    chat = flat(parse_args([str(RECIPES_DIR / "gemma3_270m_cpu.yaml")]))
    plain = flat(parse_args([str(RECIPES_DIR / "gemma3_270m_plain.yaml")]))
    differing = {key for key in chat if chat[key] != plain[key]}
    assert differing == {"chat_template", "plain_prompt_template", "plain_correction_format", "stop_strings",
                         "results_dir", "work_dir"}, differing  # fmt: skip
    probe = json.loads((REPO / "docs/results/gemma3_270m/validation/plain_prompts.json").read_text())
    assert plain["plain_prompt_template"] == probe["best"]["template"]
    assert plain["stop_strings"] == probe["stop_strings"]
    assert plain["chat_template"] is None and "{correction}" in plain["plain_correction_format"]


def test_rloo_arm_cuts_completions_at_the_stop_strings_as_score_does(tiny_model_dir, tokenizer, tmp_path):
    """Base-model runs: the rloo arm's completions end where SCoReTrainer would end an attempt, token for token."""
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    from experiments.reproduce import stop_string_rloo
    from score_trl.generation import cut_at_stop_strings

    from conftest import letter_reward

    prompts = ["the cat sat on the", "the green tree"]
    config = RLOOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                        max_completion_length=8, use_cpu=True, report_to="none", seed=0)  # fmt: skip
    dataset = Dataset.from_dict({"prompt": prompts})
    make = lambda cls: cls(model=tiny_model_dir, reward_funcs=letter_reward, args=config,  # noqa: E731
                           train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
    prompt_ids = tokenizer(prompts)["input_ids"]
    torch.manual_seed(0)
    full = make(RLOOTrainer)._generate_single_turn(prompt_ids, None, {})
    stop = tokenizer.decode(full[0][2:3])  # a token this model samples: its text is the stop string
    assert stop.strip()
    torch.manual_seed(0)
    cut = make(stop_string_rloo([stop]))._generate_single_turn(prompt_ids, None, {})
    assert cut == cut_at_stop_strings(full, tokenizer, [stop])
    assert len(cut[0]) <= 3 < len(full[0])  # the first row was cut at (or before) that token


def tiny_reproduction(recipe: str, tiny_model_dir: str, tmp_path: Path, *overrides: str):
    """A reproduction recipe parsed with the tiny model, 2 steps (Stage I, then II), small splits and overrides."""
    from experiments.reproduce import parse_args

    argv = [
        str(RECIPES_DIR / recipe),
        "--model_name_or_path", tiny_model_dir, "--results_dir", str(tmp_path / "out"),
        "--work_dir", str(tmp_path / "work"), "--max_steps", "2", "--stage_one_steps", "1",
        "--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length", "4",
        "--eval_max_new_tokens", "4", "--n_validation", "6", "--eval_batch_size", "8", *overrides,
    ]  # fmt: skip
    setup = parse_args(argv)
    setup.script.gguf_file = None
    return setup


def test_reproduce_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path):
    """Every arm trains (2 steps) and is evaluated on the test and transfer sets, the rloo and score arms for a second
    seed too; the continuation arms start from the same seed's rloo model; the tables, curves and records come from
    files the run wrote, and a rerun replaces the chosen arms unless resuming."""

    from experiments.reproduce import ARMS, main

    # the real recipe, with overrides
    setup = tiny_reproduction("smollm2_cpu.yaml", tiny_model_dir, tmp_path, "--n_test", "12", "--n_transfer", "8",
                              "--seeds", "0")  # fmt: skip
    args = setup.args
    main(setup)
    args.seeds, args.arms, args.resume = [1], ["base", "rloo", "score"], True  # the base model's evaluation is kept
    output = main(setup)
    work = tmp_path / "work"
    seed_arms = {0: ARMS, 1: ("base", "rloo", "score")}
    for seed, arms in seed_arms.items():
        for arm in arms:
            folder = output / "base" if arm == "base" else output / f"seed{seed}" / arm
            summary = json.loads((folder / "summary.json").read_text())
            assert summary["n"] == 12 and summary["num_attempts"] == 2
            records = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
            assert len(records) == 12 and all("attempt_2" in r for r in records)
            assert json.loads((folder / "transfer" / "summary.json").read_text())["n"] == 8
            run = json.loads((folder / "run.json").read_text())  # provenance, written by the run
            assert len(run["commit"]) == 40 and isinstance(run["dirty"], bool) and run["versions"]["trl"] == "1.16.0"
            assert run["command"][0] == sys.executable and run["peak_rss_mib"] > 100 and run["wall_seconds"] > 0
            if arm != "base":
                assert run["seed"] == seed
                assert (work / f"seed{seed}" / arm / "adapter" / "adapter_config.json").is_file()
                history = json.loads((folder / "log_history.json").read_text())
                assert [e["step"] for e in history if "loss" in e] == [1, 2]
    # the continuation arms trained from the same seed's rloo model with its adapter merged
    for arm in ("rloo_then_score", "rloo_2n"):
        run = json.loads((output / "seed0" / arm / "run.json").read_text())
        assert run["start_model"] == str(work / "seed0" / "rloo" / "merged")
    assert not (output / "seed1" / "base").exists()  # the untrained base is evaluated once
    history = json.loads((output / "seed0" / "score_no_stage1" / "log_history.json").read_text())
    stages = [e.get("stage") for e in history]
    assert 1.0 not in stages
    table = (output / "results.md").read_text()
    assert "Seeds: [0] (those every trained arm has finished)" in table  # seed 1 lacks five arms
    assert "## Paired differences" in table and "## Transfer" in table
    assert all(f"| {arm} |" in table for arm in ARMS) and "SCoRe Δ > 0" in table and "RLOO→SCoRe" in table
    from experiments.pooled import results_markdown

    assert "Seeds: [0, 1]" in results_markdown(output, ["base", "rloo", "score"], "test")  # the arms both seeds ran
    for png in ("curves.png", "comparison.png"):
        assert (output / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mtime = {arm: (output / "seed0" / arm / "summary.json").stat().st_mtime_ns for arm in ARMS[1:]}
    args.seeds, args.arms = [0], list(ARMS)
    main(setup)  # a stopped run continues: finished arms are kept, not redone
    assert {arm: (output / "seed0" / arm / "summary.json").stat().st_mtime_ns for arm in ARMS[1:]} == mtime
    args.resume, args.arms = False, ["rloo"]
    main(setup)  # a rerun replaces the chosen arm and seed only, and a retrained rloo arm drops its merged model
    assert (output / "seed0" / "rloo" / "summary.json").stat().st_mtime_ns != mtime["rloo"]
    assert (output / "seed0" / "score" / "summary.json").stat().st_mtime_ns == mtime["score"]
    assert not (work / "seed0" / "rloo" / "merged").exists()
    args.arms, args.seeds = ["rloo_then_score"], [7]  # no rloo arm for seed 7
    with pytest.raises(FileNotFoundError, match="run the rloo arm for seed 7 first"):
        main(setup)


@pytest.mark.parametrize("arm", ["score", "rloo"])
def test_a_preempted_arm_saves_a_checkpoint_is_not_evaluated_and_resumes(arm, tiny_model_dir, tmp_path, monkeypatch):
    """SIGTERM during training (sent for real, from inside the first reward call of step 1) ends the run with status
    75 after the step in progress, with its checkpoint and no results; --resume true continues from that step; a rerun
    without it starts afresh, dropping the old checkpoint."""
    import functools
    import os
    import signal

    import score_trl.rewards
    from experiments.reproduce import main
    from score_trl.preemption import PREEMPTED_EXIT_CODE, PreemptionCallback

    pending = {"signal": True}

    @functools.wraps(numeric_reward)
    def signalling_reward(*args, **kwargs):
        # once training has installed its handler (SCoReTrainer also calls the reward in a dry run at init)
        training = isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), PreemptionCallback)
        if training and pending.pop("signal", False):
            os.kill(os.getpid(), signal.SIGTERM)
        return numeric_reward(*args, **kwargs)

    monkeypatch.setattr(score_trl.rewards, "numeric_reward", signalling_reward)
    setup = tiny_reproduction("smollm2_cpu.yaml", tiny_model_dir, tmp_path, "--n_test", "6", "--n_transfer", "0",
                              "--seeds", "0", "--arms", arm)  # fmt: skip
    out, work = tmp_path / "out" / "seed0" / arm, tmp_path / "work" / "seed0" / arm
    with pytest.raises(SystemExit) as stopped:
        main(setup)
    assert stopped.value.code == PREEMPTED_EXIT_CODE
    assert not (out / "summary.json").exists() and not (out / "records.jsonl").exists()
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-1"]

    setup.args.resume = True
    main(setup)
    history = json.loads((out / "log_history.json").read_text())
    assert [e["step"] for e in history if "loss" in e] == [1, 2]  # step 1 from the first run, step 2 resumed
    assert json.loads((out / "summary.json").read_text())["n"] == 6

    setup.args.resume = False
    main(setup)
    assert not list(work.glob("checkpoint-*"))


def test_continuation_arms_start_from_the_rloo_adapter_merged(tiny_model_dir, tokenizer, tmp_path):
    """W' = W + (lora_alpha / r) · B A in every adapted layer; the rest of the model unchanged."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from experiments.reproduce import parse_args, start_model

    args = parse_args([str(RECIPES_DIR / "smollm2_cpu.yaml"), "--work_dir", str(tmp_path)])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)  # B != 0
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / "seed3" / "rloo" / "adapter")
    lora = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    merged_path = start_model("rloo_2n", args, 3, tiny_model_dir, tokenizer)
    assert merged_path == str(tmp_path / "seed3" / "rloo" / "merged")
    assert start_model("score", args, 3, tiny_model_dir, tokenizer) == tiny_model_dir
    merged, base = load_file(f"{merged_path}/model.safetensors"), load_file(f"{tiny_model_dir}/model.safetensors")
    checked = 0
    for name, weight in base.items():
        if "q_proj.weight" in name:
            prefix = "base_model.model." + name.removesuffix(".weight")
            delta = 2.0 * lora[f"{prefix}.lora_B.default.weight"] @ lora[f"{prefix}.lora_A.default.weight"]
            torch.testing.assert_close(merged[name].float(), weight.float() + delta, atol=1e-5, rtol=1e-5)
            checked += 1
        elif name in merged:
            assert torch.equal(merged[name].float(), weight.float()), name
    assert checked >= 1


def test_feedback_recipe_differs_from_the_reproductions_only_in_arms_evaluation_and_folders():
    from experiments.reproduce import main, parse_args

    smollm2 = flat(parse_args([str(RECIPES_DIR / "smollm2_cpu.yaml")]))
    control = flat(parse_args([str(RECIPES_DIR / "smollm2_feedback.yaml")]))
    differing = {key for key in smollm2 if smollm2[key] != control[key]}
    assert differing == {"arms", "eval_feedback", "n_transfer", "results_dir", "work_dir"}, differing
    assert control["arms"] == ["base", "score_verdict", "rloo"] and control["eval_feedback"] == ["none", "verdict"]
    choice = flat(parse_args([str(RECIPES_DIR / "smollm2_feedback_choice.yaml")]))
    assert {key for key in control if control[key] != choice[key]} == {"two_choices", "results_dir", "work_dir"}
    assert choice["two_choices"] is True and choice["n_transfer"] == 0
    with pytest.raises(ValueError, match="the transfer set has no choices; set n_transfer: 0"):  # before any model
        main(parse_args([str(RECIPES_DIR / "smollm2_feedback_choice.yaml"), "--n_transfer", "8"]))


def test_feedback_control_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path):
    """Each arm evaluated without and with the verdict; score_verdict trains with it; the report reads the records.
    Run with the two-choice recipe (which differs from smollm2_feedback.yaml only there and in its folders, as tested
    above), so the choices reach the prompts too."""
    from experiments.feedback_control import load
    from experiments.reproduce import main

    setup = tiny_reproduction(
        "smollm2_feedback_choice.yaml", tiny_model_dir, tmp_path, "--n_test", "12", "--seeds", "0"
    )
    output = main(setup)
    for arm in ("base", "seed0/score_verdict", "seed0/rloo"):
        plain = [json.loads(line) for line in (output / arm / "records.jsonl").read_text().splitlines()]
        assert all(re.search(r"\? Is it \d+ or \d+\?", r["question"]) for r in plain)
        told = [
            json.loads(line) for line in (output / arm / "feedback_verdict" / "records.jsonl").read_text().splitlines()
        ]
        assert len(plain) == len(told) == 12 and "feedback_1" not in plain[0]
        assert [r["attempt_1"] for r in plain] == [r["attempt_1"] for r in told]  # same model, same greedy y1
        assert all(r["feedback_1"] in ("Your answer is correct.", "Your answer is incorrect.") for r in told)
        summary = json.loads((output / arm / "feedback_verdict" / "summary.json").read_text())
        assert summary["correction_feedback"] == "verdict" and summary["n"] == 12
        run = json.loads((output / arm / "run.json").read_text())
        assert set(run["eval_seconds_by_feedback"]) == {"none", "verdict"}
    history = json.loads((output / "seed0" / "score_verdict" / "log_history.json").read_text())
    assert all("self_correction/told_incorrect" in h for h in history if "loss" in h)
    found = load(output)
    assert found[("score_verdict", 0, "cost")]["prompts"] == 2 * 4 // 2  # 2 steps x 4 rows / 2 generations
    told = [json.loads(line) for line in (output / "base/feedback_verdict/records.jsonl").read_text().splitlines()]
    incorrect = [r for r in told if r["feedback_1"] == "Your answer is incorrect."]
    acted = sum(last_number(r["attempt_1"]) != last_number(r["attempt_2"]) for r in incorrect)
    assert found[("base", None, "verdict")]["acted"] == (acted, len(incorrect))
    assert found[("base", None, "none")]["told"] is None
    table = (output / "results.md").read_text()
    assert "| 0 | score_verdict | verdict |" in table and "## Targets, per seed" in table and "t over seeds" in table
    assert "Greedy, two attempts, test split;" in table  # read from the runs' run.json
    assert f"| {acted} of {len(incorrect)} |" in table
