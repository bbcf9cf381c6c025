"""Run a function in a forked child, as `serve --workers` forks its workers."""

from __future__ import annotations

import ast
import os
from collections.abc import Callable


def drawn_in_a_forked_child(draw: Callable[[], object]) -> object:
    """What `draw` returns in a child forked now (as `serve --workers` forks its workers)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one draw, sent back, and out without running any clean-up
        os.write(write, repr(draw()).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        text = pipe.read().decode()
    os.waitpid(pid, 0)
    return ast.literal_eval(text)

