import json
import pickle
import re
import threading

import pytest

from score_trl.rewards import (
    REWARD_FUNCS,
    code_execution_reward,
    exact_match_reward,
    extract_answer,
    extract_code,
    get_reward_funcs,
    last_boxed,
    math_answer_reward,
    math_strict_reward,
    normalize_text,
    numeric_reward,
    reference_answer,
    task_reward,
)

from conftest import SHARED_DATA


needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"shared data folder {SHARED_DATA} is absent (it sits beside the checkout in CI)"
)


def chat(text):
    return [{"role": "assistant", "content": text}]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------------------------------
# Extraction


def test_boxed_braces_nest():
    assert last_boxed(r"first \boxed{1}, then \boxed{\frac{1}{\sqrt{2}}}.") == r"\frac{1}{\sqrt{2}}"
    assert last_boxed(r"so $\boxed 9$.") == "9"
    assert last_boxed(r"\boxed{}") == ""
    assert last_boxed("no box") is None
    assert last_boxed(r"\boxed{unclosed") is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", "\\frac{3}{4}"),
        ("Final Answer: The final answer is 12. I hope it is correct.", "12"),
        ("blah\n#### 1,080", "1080"),
        ("#### -7", "-7"),
        ("We get \\boxed{5} but wait.\nFinal Answer: The final answer is $6$. I hope it is correct.", "6"),
        ("Final Answer: The final answer is $6$. I hope it is correct. Actually \\boxed{7}", "7"),
        ("no answer here", None),
    ],
)
def test_extract_answer_takes_the_last_stated_answer(text, expected):
    assert extract_answer(text) == expected


def test_reference_answer_order():
    assert reference_answer(answer="42", solution="\\boxed{7}") == "42"
    assert reference_answer(answer="Work...\n#### 1,234") == "1234"
    assert reference_answer(answer=None, solution="so \\boxed{x^{2}}") == "x^{2}"
    assert reference_answer(answer="", solution="\\boxed{}") is None
    # GSM8K's worked answer arriving in a `solution` column
    assert reference_answer(solution="3 + 4 = <<3+4=7>>7 apples.\n#### 7") == "7"
    assert reference_answer(solution="no final answer here") is None


def test_math_reward_reads_gsm8k_answers_from_solution():
    completions = [[{"role": "assistant", "content": "Final Answer: The final answer is $72$. I hope it is correct."}]]
    solution = ["Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n48+24 = <<48+24=72>>72\n#### 72"]
    assert math_answer_reward(completions, solution=solution) == [1.0]
    assert math_answer_reward(completions, solution=[solution[0].replace("72", "71")]) == [0.0]


# ---------------------------------------------------------------------------------------------------------------------
# Math reward


def test_math_reward_values_and_logs():
    logged = {}
    rewards = math_answer_reward(
        [chat("Final Answer: The final answer is $0.5$. I hope it is correct."), chat("#### 3"), chat("I don't know"),
         chat("\\boxed{2}")],
        answer=["\\frac{1}{2}", "Work\n#### 4", "7", None],
        solution=[None, None, None, "\\boxed{}"],
        log_extra=lambda column, values: logged.setdefault(column, values),
        trainer_state=object(),  # TRL passes extra keyword arguments: ignored
        unrelated_column=[1, 2, 3, 4],
    )  # fmt: skip
    assert rewards == [1.0, 0.0, 0.0, None]  # equivalent forms match; unparseable gold is None, not 0
    assert logged == {"gold": ["\\frac{1}{2}", "4", "7", None], "predicted": ["0.5", "3", None, "2"]}


def test_math_reward_outside_the_main_thread():
    # math-verify's own timeouts use signal.alarm, which fails outside the main thread; the reward must still work
    # (with timeouts) there, e.g. in TRL's async reward loop or a thread pool.
    results = {}

    def run():
        results["value"] = math_answer_reward([chat("#### 72"), chat("\\boxed{\\frac{2}{4}}")], answer=["72", "0.5"])

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=120)
    assert results["value"] == [1.0, 1.0]


@needs_shared
def test_gsm8k_gold_answers_written_as_a_model_would():
    rows = read_jsonl(SHARED_DATA / "gsm8k" / "train.jsonl")
    golds = [reference_answer(r["answer"]) for r in rows]
    assert None not in golds
    forms = [
        "So the total is \\boxed{{{}}}.",
        "Final Answer: The final answer is ${}$. I hope it is correct.",
        "Adding up, we get the result.\n#### {}",
    ]
    completions = [
        chat(forms[i % 3].format(f"{int(g):,}" if i % 2 and g.isdigit() else g)) for i, g in enumerate(golds)
    ]
    answers = [r["answer"] for r in rows]
    assert math_answer_reward(completions, answer=answers) == [1.0] * len(rows)
    changed = [str(int(g) + 1) for g in golds]  # every GSM8K final answer is an integer
    assert math_answer_reward([chat(f"#### {c}") for c in changed], answer=answers) == [0.0] * len(rows)


@needs_shared
def test_math_boxed_gold_in_both_answer_forms():
    rows = read_jsonl(SHARED_DATA / "math" / "train.jsonl")
    solutions = [r["solution"] for r in rows]
    golds = [reference_answer(solution=s) for s in solutions]
    for form in ("Final Answer: The final answer is ${}$. I hope it is correct.", "Hence \\boxed{{{}}}."):
        rewards = math_answer_reward([chat(form.format(g)) for g in golds], solution=solutions)
        share = sum(r == 1.0 for r in rewards) / len(rows)
        misses = [rows[i]["unique_id"] for i, r in enumerate(rewards) if r != 1.0]
        assert share >= 0.995, misses[:20]
        # The misses are rows whose own solution boxes nothing (`\boxed{}`): None, not a wrong 0
        assert all(rewards[i] is None for i, r in enumerate(rewards) if r != 1.0)


# Every anchored form a model commonly writes, with GSM8K's gold "#### 1,080": (completion, default, strict)
ANSWER_FORMS = [
    ("Final Answer: The final answer is $1,080$. I hope it is correct.", 1.0, 1.0),
    ("Final Answer: The final answer is 1080. I hope it is correct.", 1.0, 1.0),
    ("Final Answer: The final answer is $1080$.", 1.0, 0.0),
    ("Final Answer: The final answer is 1080", 1.0, 0.0),
    ("Final Answer: $1080$", 1.0, 0.0),
    ("Final answer: 1,080", 1.0, 0.0),
    ("The final answer is 1080.", 1.0, 0.0),
    ("Working...\nThe answer is $1080$.", 1.0, 0.0),
    ("The answer is $1,080.", 1.0, 0.0),  # a currency sign, not a math delimiter
    ("The answer is \\$1080.00.", 1.0, 0.0),
    ("The answer is 1080 apples.", 1.0, 0.0),  # units dropped
    ("The answer is:\n\n1080", 1.0, 0.0),
    ("#### 1080", 1.0, 0.0),
    ("So we get \\boxed{1,080}.", 1.0, 0.0),
    ("The final answer is \\boxed{1080}.", 1.0, 0.0),
    # markdown emphasis around the answer or its label, and "Answer:" at the start of a line
    ("The answer is **1080**.", 1.0, 0.0),
    ("**The answer is 1080.**", 1.0, 0.0),
    ("Answer: 1080", 1.0, 0.0),
    ("**Answer:** 1080", 1.0, 0.0),
    ("ANSWER: 1,080", 1.0, 0.0),
    ("Some working.\n**Final Answer**: 1080", 1.0, 0.0),
    ("Final answer: **1080**", 1.0, 0.0),
    ("> **Answer**: 1080", 1.0, 0.0),
    # no anchor: a bare number is not an answer, nor "answer:" inside a sentence
    ("1080", 0.0, 0.0),
    ("Here is my answer: 1080", 0.0, 0.0),
    ("We add 1000 and 80 to get 1080.", 0.0, 0.0),
    # wrong values in every form stay 0
    ("Final Answer: The final answer is $1,081$. I hope it is correct.", 0.0, 0.0),
    ("Final Answer: $1081$", 0.0, 0.0),
    ("The answer is 1081 apples.", 0.0, 0.0),
    ("\\boxed{1081}", 0.0, 0.0),
    ("#### -1080", 0.0, 0.0),
    ("The answer is **1081**.", 0.0, 0.0),
    ("Answer: 1081", 0.0, 0.0),
    ("**Answer:** 1081", 0.0, 0.0),
    ("ANSWER: 1081", 0.0, 0.0),
    ("**Final Answer**: 1081", 0.0, 0.0),
    ("Answer: -1080", 0.0, 0.0),
    # the last anchored answer wins, whatever its form
    ("The answer is 1081. Wait, I made an error. The final answer is $1080$.", 1.0, 0.0),
    ("The answer is 1080. Let me check again: \\boxed{1081}", 0.0, 0.0),
    ("Final Answer: The final answer is $1081$. I hope it is correct.\nThe answer is 1080.", 1.0, 0.0),
    ("Final Answer: The final answer is $1080$. I hope it is correct.\nThe answer is 1081.", 0.0, 1.0),
]


@pytest.mark.parametrize("text, default, strict", ANSWER_FORMS, ids=[f"form{i}" for i in range(len(ANSWER_FORMS))])
def test_math_reward_reads_every_anchored_form(text, default, strict):
    for column in ("answer", "solution"):  # GSM8K gold in either column
        gold = {column: ["Natalia sold 1,000 + 80 clips.\n#### 1,080"]}
        assert math_answer_reward([chat(text)], **gold) == [default], column
        assert math_strict_reward([chat(text)], **gold) == [strict], column


@pytest.mark.parametrize(
    "text, gold, expected",
    [
        ("Final Answer: The final answer is $\\frac{1}{2}$.", "\\boxed{\\frac12}", 1.0),
        ("The answer is 1/2.", "\\boxed{\\frac12}", 1.0),
        ("The answer is 0.5", "\\boxed{\\frac12}", 1.0),
        ("Final Answer: $\\frac{1}{3}$", "\\boxed{\\frac12}", 0.0),
        ("The final answer is $-7$.", "#### -7", 1.0),
        ("The final answer is \u22127.", "#### -7", 1.0),  # a typeset minus sign
        ("The final answer is 7.", "#### -7", 0.0),
        ("The answer is 3.5 hours.", "#### 3.5", 1.0),
        ("The answer is $x^2+1$.", "so \\boxed{x^{2}+1}", 1.0),
        ("Final Answer: \\(\\sqrt{2}\\)", "\\boxed{\\sqrt 2}", 1.0),
    ],
)
def test_math_reward_fractions_negatives_units_expressions(text, gold, expected):
    assert math_answer_reward([chat(text)], solution=[gold]) == [expected]


def test_strict_reward_is_registered_and_extraction_strictness():
    assert get_reward_funcs(["math_strict"]) == [math_strict_reward]
    text = "The final answer is $6$."
    assert extract_answer(text) == "6" and extract_answer(text, strict=True) is None


# ---------------------------------------------------------------------------------------------------------------------
# Exact match


def test_normalization():
    assert normalize_text("The capital of France is  PARIS!") == "capital of france is paris"
    assert normalize_text("It costs $1,000.50, i.e. 2.0 units") == "it costs 1000.5 ie 2 units"


def test_exact_match_reward():
    rewards = exact_match_reward(
        [chat("The capital of France is Paris."), chat("paris"), chat("Lyon"), chat("It is 1,000.")],
        correct_answer=["The capital of France is Paris", "Paris", "Paris", "1000"],
    )
    assert rewards == [1.0, 1.0, 0.0, 1.0]
    assert exact_match_reward([chat("x")], answer=[None]) == [None]
    assert exact_match_reward([chat("Parisian")], answer=["Paris"]) == [0.0]  # whole words only


# ---------------------------------------------------------------------------------------------------------------------
# Code execution and the sandbox


def test_extract_code():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n```\n```py\ny = 2\n```") == "y = 2\n"
    assert extract_code("def f(): pass") == "def f(): pass"


def test_code_reward_mbpp_and_humaneval_styles():
    good = chat("```python\ndef add(a, b):\n    return a + b\n```")
    bad = chat("def add(a, b):\n    return a - b")
    tests = ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]
    assert code_execution_reward([good, bad, good], test_list=[tests, tests, None]) == [1.0, 0.0, None]
    check = "def check(candidate):\n    assert candidate(2, 2) == 4\n"
    rewards = code_execution_reward([good, bad], test=[check, check], entry_point=["add", "add"])
    assert rewards == [1.0, 0.0]


@needs_shared
def test_mbpp_reference_solutions_pass_and_broken_ones_fail():
    rows = read_jsonl(SHARED_DATA / "mbpp" / "mbpp.jsonl")
    columns = dict(test_list=[r["test_list"] for r in rows], test_setup_code=[r["test_setup_code"] for r in rows])
    reference = [chat(f"```python\n{r['code']}\n```") for r in rows]
    assert code_execution_reward(reference, **columns) == [1.0] * len(rows)
    # Every reference solution passes (a check of the data and the sandbox); that the reward fails broken code needs
    # no more than every 8th row (the whole set doubled this test's ~100 s). Broken: every function returns None.
    sample = rows[::8]
    broken = [chat(re.sub(r"\breturn\b", "return None and ", r["code"])) for r in sample]
    columns = {key: values[::8] for key, values in columns.items()}
    assert code_execution_reward(broken, **columns) == [0.0] * len(sample)


# ---------------------------------------------------------------------------------------------------------------------
# Registry


def test_registry_names_and_dotted_paths():
    assert get_reward_funcs(["math", "exact_match", "code", "task"]) == [
        math_answer_reward,
        exact_match_reward,
        code_execution_reward,
        task_reward,
    ]
    assert get_reward_funcs("score_trl.rewards.exact_match_reward") == [exact_match_reward]
    assert get_reward_funcs("score_trl.rewards:math_answer_reward") == [math_answer_reward]
    with pytest.raises(ValueError, match="Unknown reward 'nope'"):
        get_reward_funcs(["nope"])
    with pytest.raises(ValueError, match="Cannot load reward 'score_trl.rewards.missing'"):
        get_reward_funcs(["score_trl.rewards.missing"])


def test_rewards_pickle():
    for func in REWARD_FUNCS.values():
        assert pickle.loads(pickle.dumps(func)) is func
    assert pickle.loads(pickle.dumps(REWARD_FUNCS)) == REWARD_FUNCS


@pytest.mark.parametrize(
    "text, gold, expected",
    [("-4", "4", 0.0), ("-4", "-4", 1.0), ("The result is \u22124.", "-4", 1.0), ("4", "-4", 0.0),
     ("8 - 4 = 4", "4", 1.0), ("8-4 is 4", "-4", 0.0), ("It is -3.50", "-3.5", 1.0)],
)  # fmt: skip
def test_numeric_and_exact_match_keep_the_sign(text, gold, expected):
    assert numeric_reward([chat(text)], answer=[gold]) == [expected]
    if text.lstrip("-\u2212").replace(".", "").isdigit():  # a bare number: exact match reads it the same way
        assert exact_match_reward([chat(text)], answer=[gold]) == [expected]
