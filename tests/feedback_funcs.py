"""Feedback functions for the tests, importable by dotted path (`correction_feedback="feedback_funcs.NAME"`) from
tests and from the scripts they launch."""

import os
import time


def echo_length(prompts, completions, rewards, **kwargs):
    """A judge's stand-in: names the attempt's length in characters and its reward."""
    texts = [c[0]["content"] for c in completions]
    return [f"Your reply has {len(t)} characters; reward {r}." for t, r in zip(texts, rewards, strict=True)]


def not_a_string(completions, **kwargs):
    return ["fine", 3][: len(completions)] + ["fine"] * max(len(completions) - 2, 0)


def long_judge(completions, **kwargs):
    return ["very " * 200 + "long feedback"] * len(completions)


def slow_on_answers(completions, **kwargs):
    """Fast on the empty placeholders of the dry run, slow on real attempts (for reward_timeout)."""
    if any(c[0]["content"] for c in completions):
        time.sleep(3)
    return [None] * len(completions)


def fail_on_rank_one(completions, **kwargs):
    """Fails on real attempts in the second process only: the run must still end on every rank."""
    if os.environ.get("RANK") == "1" and any(c[0]["content"] for c in completions):
        raise RuntimeError("judge unreachable")
    return [None] * len(completions)
