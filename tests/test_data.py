import csv
import json

import pytest
import torch
from datasets import Dataset

from score_trl import MATH_CORRECTION_INSTRUCTION, SCoReTrainer
from score_trl.data import (
    CODE_CORRECTION_INSTRUCTION,
    TASKS,
    DataFormatError,
    build_prompt,
    load_score_dataset,
    to_score_rows,
)
from score_trl.turns import instruction_for

from conftest import SHARED_DATA, letter_reward, make_args


GSM8K_ROW = {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}
MATH_ROW = {"problem": "Find $x$ if $x+1=3$.", "solution": "So $x=\\boxed{2}$.", "level": "Level 1", "type": "Algebra"}
MBPP_ROW = {"text": "Write a function add.", "test_list": ["assert add(1, 2) == 3"], "test_setup_code": ""}
HUMANEVAL_ROW = {
    "prompt": "def add(a, b):\n",
    "test": "def check(c):\n    assert c(1, 2) == 3\n",
    "entry_point": "add",
}
SEED_ROW = {"question": "Capital of France?", "original_answer": "Lyon", "correct_answer": "Paris"}


def write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


@pytest.mark.parametrize(
    "row, kept, instruction",
    [
        (GSM8K_ROW, {"answer"}, MATH_CORRECTION_INSTRUCTION),
        (MATH_ROW, {"solution", "level", "type"}, MATH_CORRECTION_INSTRUCTION),
        (MBPP_ROW, {"test_list", "test_setup_code"}, CODE_CORRECTION_INSTRUCTION),
        (HUMANEVAL_ROW, {"test", "entry_point"}, CODE_CORRECTION_INSTRUCTION),
        (SEED_ROW, {"correct_answer", "original_answer"}, TASKS["short_answer"].correction_instruction),
    ],
    ids=["gsm8k", "math", "mbpp", "humaneval", "seed"],
)
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_formats_from_files(tmp_path, row, kept, instruction, suffix):
    dataset = load_score_dataset(str(write(tmp_path / f"data{suffix}", [row, row])))
    assert len(dataset) == 2
    assert kept <= set(dataset.column_names)
    item = dataset[0]
    assert item["prompt"][0]["role"] == "user" and len(item["prompt"]) == 1
    assert item["correction_instruction"] == instruction
    question = row.get("question") or row.get("problem") or row.get("text") or row["prompt"]
    assert question.strip() in item["prompt"][0]["content"]


def test_seed_format_from_csv_and_generic_columns(tmp_path):
    dataset = load_score_dataset(str(write(tmp_path / "seed.csv", [SEED_ROW] * 3)))
    assert dataset[0]["correct_answer"] == "Paris"
    generic = write(tmp_path / "qa.jsonl", [{"q": "2+2?", "a": "4"}])
    dataset = load_score_dataset(str(generic), question_column="q", answer_column="a", task="short_answer")
    assert dataset[0]["answer"] == "4" and "2+2?" in dataset[0]["prompt"][0]["content"]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data folder {SHARED_DATA} is absent")
def test_shared_files_load():
    gsm8k = load_score_dataset(str(SHARED_DATA / "gsm8k" / "train.jsonl"), limit=5)
    math = load_score_dataset(str(SHARED_DATA / "math" / "train.jsonl"), limit=5)
    mbpp = load_score_dataset(str(SHARED_DATA / "mbpp" / "mbpp.jsonl"), limit=5)
    assert {"prompt", "answer"} <= set(gsm8k.column_names)
    assert {"prompt", "solution"} <= set(math.column_names)
    assert {"prompt", "test_list"} <= set(mbpp.column_names)
    assert "assert min_cost" in mbpp[0]["prompt"][0]["content"]  # the tests name the function to write


def test_missing_column_names_file_row_and_column(tmp_path):
    path = write(tmp_path / "gsm.jsonl", [GSM8K_ROW, {"question": "Q?", "answer": ""}])
    # 1-based, like the line numbers of JSON errors: the second row of the file is row 2
    with pytest.raises(DataFormatError, match=r"gsm.jsonl row 2: missing or empty column 'answer'"):
        load_score_dataset(str(path))


def test_unknown_columns_name_the_expected_ones(tmp_path):
    with pytest.raises(DataFormatError, match=r"Cannot tell the dataset's format from its columns \['foo'\]"):
        load_score_dataset(str(write(tmp_path / "x.jsonl", [{"foo": 1}])))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataFormatError, match="empty.jsonl is empty"):
        load_score_dataset(str(path))


def test_non_utf8_file_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        json.dumps(GSM8K_ROW).encode() + b"\n" + '{"question": "caf\xe9", "answer": "1"}'.encode("latin-1")
    )
    with pytest.raises(DataFormatError, match=r"latin1.jsonl line 2: not valid UTF-8 \(byte 0xe9\)"):
        load_score_dataset(str(path))


def test_invalid_json_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GSM8K_ROW) + "\n{not json\n")
    with pytest.raises(DataFormatError, match="broken.jsonl line 2: invalid JSON"):
        load_score_dataset(str(path))


def test_system_prompt_folded_only_when_the_template_rejects_it(tokenizer):
    folded = build_prompt("Q?", "{question}", system_prompt="Be brief.", tokenizer=tokenizer)  # Gemma template
    assert folded == [{"role": "user", "content": "Be brief.\n\nQ?"}]
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    kept = build_prompt("Q?", "{question}", system_prompt="Be brief.", tokenizer=tokenizer)
    assert kept == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}]


def test_first_attempt_fraction_is_seeded():
    rows = to_score_rows([SEED_ROW] * 200, source="mem", first_attempt_fraction=0.25, seed=3)
    chosen = [r["first_attempt"] is not None for r in rows]
    assert 30 < sum(chosen) < 70 and all(r["first_attempt"] == "Lyon" for r, c in zip(rows, chosen, strict=True) if c)
    again = to_score_rows([SEED_ROW] * 200, source="mem", first_attempt_fraction=0.25, seed=3)
    assert [r["first_attempt"] for r in again] == [r["first_attempt"] for r in rows]
    with pytest.raises(DataFormatError, match="first_attempt_fraction=1.5"):
        to_score_rows([SEED_ROW], source="mem", first_attempt_fraction=1.5)


@pytest.mark.parametrize("num_attempts", [2, 3], ids=["two_attempts", "three_attempts"])
def test_trainer_uses_given_first_attempts_and_row_instructions(tmp_path, tiny_model_dir, tokenizer, num_attempts):
    trainer = SCoReTrainer(
        tiny_model_dir,
        reward_funcs=letter_reward,
        args=make_args(tmp_path, stage_one_steps=0, num_attempts=num_attempts),
        train_dataset=Dataset.from_list(to_score_rows([SEED_ROW] * 4, source="mem")),
        processing_class=tokenizer,
    )
    trainer.model.train()
    rows = to_score_rows([SEED_ROW, SEED_ROW], source="mem", first_attempt_fraction=1.0)
    rows += to_score_rows([MBPP_ROW, MBPP_ROW], source="mem")
    rows = list(Dataset.from_list(rows))  # a mixed-task dataset: every row has every column, None where absent
    sampled_sizes = []
    generate = trainer._generate_single_turn

    def counting(prompt_ids, *args):
        sampled_sizes.append(len(prompt_ids))
        return generate(prompt_ids, *args)

    trainer._generate_single_turn = counting
    batch = trainer._generate_and_score_completions(rows)
    # Turn 1 sampled only the two rows without a given attempt; every later turn sampled all four
    assert sampled_sizes == [2] + [4] * (num_attempts - 1)
    given_ids = tokenizer("Lyon", add_special_tokens=False)["input_ids"]
    for i in range(4):
        ids = batch["completion_ids"][i][batch["completion_mask"][i].bool()].tolist()
        turns = batch["turn_ids"][i][batch["completion_mask"][i].bool()].tolist()
        instruction = rows[i]["correction_instruction"]
        bridge = trainer._turns.bridge(instruction)
        if i < 2:  # the given y1 sits in the context, untrained, followed by the seed task's own instruction
            assert ids[: len(given_ids)] == given_ids and 1 not in turns
            assert ids[len(given_ids) : len(given_ids) + len(bridge.after(given_ids))] == bridge.after(given_ids)
        else:  # code rows get the code instruction
            y1 = ids[: turns.count(1)]
            assert ids[len(y1) : len(y1) + len(bridge.after(y1))] == bridge.after(y1)
            assert tokenizer.decode(bridge.instruction_ids).count("rewrite the complete program") == 1
        if num_attempts == 3:  # the third attempt follows the second with the row's own instruction again
            start = turns.index(2)
            y2 = ids[start : start + turns.count(2)]
            after = ids[start + len(y2) : start + len(y2) + len(bridge.after(y2))]
            assert after == bridge.after(y2) and turns.count(3) > 0
    # Given rows are out of the turn-1 baseline: in the pair (0, 1) both are given, so both turn-1 advantages are 0
    assert batch["advantages"][:2, 0].tolist() == [0.0, 0.0]
    assert torch.isfinite(batch["advantages"]).all()

    # A correction_instruction set in the config applies to every row
    assert instruction_for(rows[2], "Try again.") == "Try again."
