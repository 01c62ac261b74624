"""A plain-Python Countdown, written independently of envs/countdown for cross-checking.

Also the baseline for ``experiments/bench.py --suite=env`` (a Python env stepped one
action at a time).
"""

from __future__ import annotations

INT32_MAX = 2**31 - 1


def pair_list(n):
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def combine(a, b, op):
    """Result of op (0 add, 1 mul, 2 larger-minus-smaller, 3 exact division) or None."""
    big, small = max(a, b), min(a, b)
    if op == 0:
        value = a + b
    elif op == 1:
        value = a * b
    elif op == 2:
        value = big - small
    else:
        if small == 0 or big % small != 0:
            return None
        value = big // small
    return None if value > INT32_MAX else value


def num_solutions(nums, target):
    """Move sequences that end in exactly [target] (recursive, big ints)."""
    if len(nums) == 1:
        return int(nums[0] == target)
    total = 0
    for i, j in pair_list(len(nums)):
        rest = [x for k, x in enumerate(nums) if k not in (i, j)]
        for op in range(4):
            value = combine(nums[i], nums[j], op)
            if value is not None:
                total += num_solutions(rest + [value], target)
    return total


class PyCountdown:
    """One Countdown episode in Python; same observation layout as Countdown-v0."""

    def __init__(self, num_numbers):
        self.n = num_numbers
        self.pairs = pair_list(num_numbers)

    def reset(self, nums, target):
        self.nums = list(nums)
        self.target = target
        return self.obs()

    def obs(self):
        pad = self.n - len(self.nums)
        return [self.target] + self.nums + [0] * pad + [1] * len(self.nums) + [0] * pad

    def legal(self, action):
        if not 0 <= action < 4 * len(self.pairs):
            return False
        i, j = self.pairs[action // 4]
        return j < len(self.nums) and combine(self.nums[i], self.nums[j], action % 4) is not None

    def mask(self):
        return [self.legal(a) for a in range(4 * len(self.pairs))]

    def step(self, action):
        """-> (obs, reward, terminated, illegal)."""
        if not self.legal(action):
            return self.obs(), 0.0, True, True
        i, j = self.pairs[action // 4]
        value = combine(self.nums[i], self.nums[j], action % 4)
        self.nums = [x for k, x in enumerate(self.nums) if k not in (i, j)] + [value]
        done = len(self.nums) == 1
        reward = 1.0 if done and self.nums[0] == self.target else 0.0
        return self.obs(), reward, done, False
