"""A reward that only waits (always None, so it never changes a score): paces an evaluation so a test can kill it
between two batches."""

import time


def pause(completions, **kwargs):
    time.sleep(0.4)
    return [None] * len(completions)
