"""The Countdown trace language at the text level (see docs/trace_format.md): verifier, spawn/join."""

from jaxapr.traces.solvers import apr, sos, sosp
from jaxapr.traces.spawn_join import (
    CallTree,
    SubSearch,
    child_prompts,
    child_result,
    join,
    parse_spawn_block,
    root_prompt,
)
from jaxapr.traces.token_verifier import verify_tokens
from jaxapr.traces.verifier import Verdict, goal_line_spans, verify

__all__ = [
    "CallTree",
    "SubSearch",
    "Verdict",
    "apr",
    "child_prompts",
    "child_result",
    "goal_line_spans",
    "join",
    "parse_spawn_block",
    "root_prompt",
    "sos",
    "sosp",
    "verify",
    "verify_tokens",
]
