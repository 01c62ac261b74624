"""The Countdown puzzle: rules, exhaustive solver, problem generation and ``Countdown-v0``."""
from envs.countdown.env import Countdown, EnvParams, EnvState, make_params
from envs.countdown.problems import ProblemSplits, generate_problems, make_splits, problem_keys
from envs.countdown.rules import (
    ADD,
    DIV,
    MAX_NUMBERS,
    MAX_VALUE,
    MIN_NUMBERS,
    MUL,
    NUM_OPS,
    SUB,
    apply_move,
    apply_op,
    count_solutions,
    decode_action,
    encode_action,
    is_solvable,
    legal_mask,
    moves,
    num_actions,
    op_text,
    solve,
    solved_sequences,
)

__all__ = [
    "ADD", "DIV", "MAX_NUMBERS", "MAX_VALUE", "MIN_NUMBERS", "MUL", "NUM_OPS", "SUB",
    "Countdown", "EnvParams", "EnvState", "ProblemSplits", "apply_move", "apply_op",
    "count_solutions", "decode_action", "encode_action", "generate_problems", "is_solvable",
    "legal_mask", "make_params", "make_splits", "moves", "num_actions", "op_text",
    "problem_keys", "solve", "solved_sequences",
]
