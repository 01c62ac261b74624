"""spawn/join text ops and CallTree: fixture conformance, nesting, malformed input."""

import copy

import pytest

from jaxapr.traces import CallTree, child_prompts, child_result, join, parse_spawn_block, verify
from tests.traces import mutations


def threads(tree):
    """Every thread (dict) of a fixture tree, root first."""
    yield tree
    for children in tree["sub_calls"]:
        for child in children:
            yield from threads(child)


# --------------------------------------------------------------------------------------
# Conformance on the fixtures
# --------------------------------------------------------------------------------------
def test_child_prompts_are_the_first_two_lines_of_each_child(fixture_rows):
    checked = 0
    for row in fixture_rows:
        for thread in threads(row["apr"]["tree"]):
            for k, children in enumerate(thread["sub_calls"]):
                prompts = child_prompts(thread["main_calls"][k])
                assert len(prompts) == len(children)
                for prompt, child in zip(prompts, children):
                    first_two = "".join(child["main_calls"][0].splitlines(keepends=True)[:2])
                    assert prompt == first_two
                    checked += 1
    assert checked > 1000


def test_join_is_a_prefix_of_the_next_call(fixture_rows):
    checked = 0
    for row in fixture_rows:
        for thread in threads(row["apr"]["tree"]):
            for k, children in enumerate(thread["sub_calls"]):
                joined = join(thread["main_calls"][k], [c["main_calls"][-1] for c in children])
                assert joined.endswith("<End Sub Searches>\n")
                assert thread["main_calls"][k + 1].startswith(joined), (row["id"], k)
                # the spawn block is gone, the parent's text before it kept
                parent = thread["main_calls"][k]
                assert joined.startswith(parent[: parent.index("<Calling Sub Searches>")])
                checked += 1
    assert checked == 200


def test_child_results(fixture_rows):
    succeeded = 0
    for row in fixture_rows:
        for thread in threads(row["apr"]["tree"]):
            for children in thread["sub_calls"]:
                for child in children:
                    text = child["main_calls"][-1]
                    result = child_result(text)
                    if not mutations.reached_goal(text):
                        assert result is None
                        continue
                    succeeded += 1
                    first = child["main_calls"][0].splitlines(keepends=True)[0]
                    assert result.startswith(first) and result.endswith("equal: Goal Reached\n")
                    assert text.endswith(result)
                    assert result.count("Goal Reached") == 1
    assert succeeded > 100


def test_call_tree_round_trip_and_validate(fixture_rows):
    for row in fixture_rows:
        tree = CallTree.from_dict(row["apr"]["tree"])
        assert tree.to_dict() == row["apr"]["tree"]
        assert CallTree.from_dict(tree.to_dict()) == tree
        assert tree.final_text == row["apr"]["tree"]["main_calls"][-1]
        tree.validate()


def _multi_call_row(fixture_rows):
    return next(r for r in fixture_rows if len(r["apr"]["tree"]["main_calls"]) >= 3)


def test_validate_catches_inconsistent_trees(fixture_rows):
    base = _multi_call_row(fixture_rows)["apr"]["tree"]

    def broken(edit):
        d = copy.deepcopy(base)
        edit(d)
        return CallTree.from_dict(d)

    cases = {
        "does not start with its prompt": lambda d: d["sub_calls"][0][1]["main_calls"].__setitem__(
            0, d["sub_calls"][0][1]["main_calls"][0].replace("Operations: [", "Operations: ['1+1=2', ", 1)
        ),
        "does not start with the join": lambda d: d["main_calls"].__setitem__(
            1, d["main_calls"][1].replace("<No Solution", "<Goal Reached", 1)
        ),
        "children recorded": lambda d: d["sub_calls"][0].pop(),
        "sub_calls entries": lambda d: d["sub_calls"].pop(),
        "no spawn block": lambda d: d["main_calls"].__setitem__(
            0, d["main_calls"][0].replace("<Calling Sub Searches>\n", "")
        ),
        "expected 1": lambda d: d["main_calls"].__setitem__(
            0, d["main_calls"][0].replace("at level 1>", "at level 2>")
        ),
        "non-empty list of str": lambda d: d["main_calls"].clear(),
    }
    for message, edit in cases.items():
        with pytest.raises(ValueError, match=message) as e:
            broken(edit).validate()
        assert "\n" not in str(e.value)


def test_from_dict_rejects_bad_shapes():
    for bad in (
        None,
        {},
        {"main_calls": "x"},
        {"main_calls": ["x"], "sub_calls": "y"},
        {"main_calls": ["x"], "sub_calls": [1]},
    ):
        with pytest.raises(ValueError):
            CallTree.from_dict(bad)


# --------------------------------------------------------------------------------------
# Nesting (children that spawn: level 2)
# --------------------------------------------------------------------------------------
def nested_tree(grandchild_level=2):
    """nums [1, 2, 3, 4], target 36: root spawns #0,0 (1+2=3), which spawns #0,0,0 (3*4=12,
    solved by 3*12=36) and #0,0,1 (3+4=7, no solution)."""
    state = "Current State: 36:"
    root0 = (
        f"Moving to Node #0\n{state}[1, 2, 3, 4], Operations: []\n"
        "Exploring Operation: 1+2=3, Resulting Numbers: [3, 4, 3]\n"
        "Generated Node #0,0: 36:[3, 4, 3] Operation: 1+2=3\n"
        "<Calling Sub Searches>\n<Start Sub Search 0 at level 1> Moving to Node #0,0\n<End Calling Sub Searches>\n"
    )
    child0 = (
        f"Moving to Node #0,0\n{state}[3, 4, 3], Operations: ['1+2=3']\n"
        "Exploring Operation: 3*4=12, Resulting Numbers: [3, 12]\n"
        "Generated Node #0,0,0: 36:[3, 12] Operation: 3*4=12\n"
        "Exploring Operation: 3+4=7, Resulting Numbers: [3, 7]\n"
        "Generated Node #0,0,1: 36:[3, 7] Operation: 3+4=7\n"
        "<Calling Sub Searches>\n"
        f"<Start Sub Search 0 at level {grandchild_level}> Moving to Node #0,0,0\n"
        f"<Start Sub Search 1 at level {grandchild_level}> Moving to Node #0,0,1\n"
        "<End Calling Sub Searches>\n"
    )
    gc_path = (
        f"Moving to Node #0,0,0\n{state}[3, 12], Operations: ['1+2=3', '3*4=12']\n"
        "Exploring Operation: 3*12=36, Resulting Numbers: [36]\n36,36 equal: Goal Reached\n"
    )
    grandchild0 = gc_path + gc_path
    grandchild1 = (
        f"Moving to Node #0,0,1\n{state}[3, 7], Operations: ['1+2=3', '3+4=7']\n"
        "Exploring Operation: 3+7=10, Resulting Numbers: [10]\n10,36 unequal: No Solution\n"
        "Exploring Operation: 3*7=21, Resulting Numbers: [21]\n21,36 unequal: No Solution\n"
        "Exploring Operation: 7-3=4, Resulting Numbers: [4]\n4,36 unequal: No Solution\nNo solution found.\n"
    )
    child_path = (
        f"Moving to Node #0,0\n{state}[3, 4, 3], Operations: ['1+2=3']\n"
        "Exploring Operation: 3*4=12, Resulting Numbers: [3, 12]\n"
        "Generated Node #0,0,0: 36:[3, 12] Operation: 3*4=12\n" + gc_path
    )
    child1 = join(child0, [grandchild0, grandchild1]) + "36,36 equal: Goal Reached\n" + child_path
    root_path = (
        f"Moving to Node #0\n{state}[1, 2, 3, 4], Operations: []\n"
        "Exploring Operation: 1+2=3, Resulting Numbers: [3, 4, 3]\n"
        "Generated Node #0,0: 36:[3, 4, 3] Operation: 1+2=3\n" + child_path
    )
    root1 = join(root0, [child1]) + "36,36 equal: Goal Reached\n" + root_path
    grandchildren = [CallTree([grandchild0]), CallTree([grandchild1])]
    return CallTree([root0, root1], [[CallTree([child0, child1], [grandchildren])]])


def test_nested_spawns_validate_and_verify():
    tree = nested_tree()
    tree.validate()
    child = tree.sub_calls[0][0]
    assert parse_spawn_block(child.main_calls[0]) == [(0, 2, "0,0,0"), (1, 2, "0,0,1")]
    assert child_prompts(child.main_calls[0]) == [
        "Moving to Node #0,0,0\nCurrent State: 36:[3, 12], Operations: ['1+2=3', '3*4=12']\n",
        "Moving to Node #0,0,1\nCurrent State: 36:[3, 7], Operations: ['1+2=3', '3+4=7']\n",
    ]
    joined = join(child.main_calls[0], [child.sub_calls[0][0].final_text, None])
    assert "<Goal Reached in Sub Search 0 at level 2 at Node #0,0,0>\nMoving to Node #0,0,0\n" in joined
    assert joined.endswith("<No Solution in Sub Search 1 at level 2 at Node #0,0,1>\n<End Sub Searches>\n")
    assert verify(tree.final_text, [1, 2, 3, 4], 36).success
    assert verify(child.final_text, [3, 4, 3], 36).success
    assert verify(child.sub_calls[0][0].final_text, [3, 12], 36).success
    assert not verify(child.final_text, [1, 2, 3, 4], 36).success
    assert CallTree.from_dict(tree.to_dict()) == tree


def test_nested_level_must_be_one_deeper():
    with pytest.raises(ValueError, match="spawns at level 1, expected 2"):
        nested_tree(grandchild_level=1).validate()


# --------------------------------------------------------------------------------------
# Malformed input
# --------------------------------------------------------------------------------------
PARENT = (
    "Moving to Node #0\nCurrent State: 27:[22, 26, 31, 53], Operations: []\n"
    "Exploring Operation: 53-26=27, Resulting Numbers: [22, 31, 27]\n"
    "Generated Node #0,0: 27:[22, 31, 27] Operation: 53-26=27\n"
    "Exploring Operation: 53-22=31, Resulting Numbers: [26, 31, 31]\n"
    "Generated Node #0,1: 27:[26, 31, 31] Operation: 53-22=31\n"
)
BLOCK = (
    "<Calling Sub Searches>\n<Start Sub Search 0 at level 1> Moving to Node #0,0\n"
    "<Start Sub Search 1 at level 1> Moving to Node #0,1\n<End Calling Sub Searches>\n"
)


def test_spawn_join_on_the_format_example():
    assert parse_spawn_block(PARENT + BLOCK) == [(0, 1, "0,0"), (1, 1, "0,1")]
    assert (
        child_prompts(PARENT + BLOCK)[1]
        == "Moving to Node #0,1\nCurrent State: 27:[26, 31, 31], Operations: ['53-22=31']\n"
    )
    assert child_prompts("Sub Call Budget: 2 " + PARENT + BLOCK) == child_prompts(PARENT + BLOCK)  # conditioning prefix
    child1 = (
        "Moving to Node #0,1\nCurrent State: 27:[26, 31, 31], Operations: ['53-22=31']\n"
        "Exploring Operation: 31/31=1, Resulting Numbers: [26, 1]\n"
        "Generated Node #0,1,0: 27:[26, 1] Operation: 31/31=1\n"
        "Moving to Node #0,1,0\nCurrent State: 27:[26, 1], Operations: ['53-22=31', '31/31=1']\n"
        "Exploring Operation: 26+1=27, Resulting Numbers: [27]\n27,27 equal: Goal Reached"
    )
    text = child1 + "\n" + child1  # no final newline: the result still ends with one
    assert child_result(text) == child1 + "\n"
    assert child_result(text + "\nExit Sub Search at level 1\n\n") == child1 + "\n"
    assert child_result(text + "\nNo solution found.\n") is None
    assert child_result(child1) is None and child_result(None) is None and child_result("") is None
    assert join(PARENT + BLOCK, ["No solution found.\n", text]) == (
        PARENT + "<Sub Searches>\n<No Solution in Sub Search 0 at level 1 at Node #0,0>\n"
        "<Goal Reached in Sub Search 1 at level 1 at Node #0,1>\n" + child1 + "\n<End Sub Searches>\n"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        (PARENT, "no spawn block"),
        (PARENT + BLOCK.replace("<End Calling Sub Searches>\n", ""), "unclosed spawn block"),
        (PARENT + BLOCK.replace("Search 1 at", "Search 2 at"), "index 2, expected 1"),
        (PARENT + BLOCK.replace("Search 0 at", "Search 1 at"), "index 1, expected 0"),
        (PARENT + BLOCK.replace("Search 1 at level 1", "Search 1 at level 2"), "level 2, expected 1"),
        (
            PARENT + BLOCK.replace("<End Calling", "Exploring Operation: 1+1=2\n<End Calling"),
            "is not '<Start Sub Search",
        ),
        (PARENT + BLOCK.replace("#0,1\n", "#0,01\n"), "is not '<Start Sub Search"),
        (PARENT + BLOCK.replace("level 1>", "level 0>"), "is not '<Start Sub Search"),
        (PARENT + BLOCK.replace("#0,1\n", "#0,0\n"), "spawned twice"),
        (PARENT + BLOCK + "Exploring Operation: 1+1=2\n", "text after"),
        (PARENT + "<Calling Sub Searches>\n<End Calling Sub Searches>\n", "empty spawn block"),
    ],
)
def test_malformed_spawn_blocks(text, message):
    for fn in (parse_spawn_block, child_prompts, lambda t: join(t, [None, None])):
        with pytest.raises(ValueError, match=message) as e:
            fn(text)
        assert "\n" not in str(e.value)


def test_join_needs_one_text_per_child_and_a_spawn_block():
    for texts in ([], [None], [None, None, None]):
        with pytest.raises(ValueError, match=f"join got {len(texts)} child texts, expected 2") as e:
            join(PARENT + BLOCK, texts)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no spawn block"):
        join(PARENT, [])
    with pytest.raises(TypeError):
        join(PARENT + BLOCK, [None, 3])


def test_child_prompts_needs_the_generated_node():
    text = PARENT + BLOCK.replace("#0,1\n", "#0,5\n")
    with pytest.raises(ValueError, match=r"sub search 1: no 'Generated Node #0,5") as e:
        child_prompts(text)
    assert "\n" not in str(e.value)


def test_budget_prefix_round_trip():
    """The paper's conditioning prefix, written and read back from a root prompt."""
    from jaxapr.traces import root_prompt, spawn_join

    for b in (0, 2, 17):
        prompt = root_prompt([1, 2, 3, 4], 10, prefix=spawn_join.budget_prefix(b))
        assert prompt.startswith(f"Sub Call Budget: {b} Moving to Node #0\n")
        assert spawn_join.prompt_budget(prompt) == b
    assert spawn_join.prompt_budget(root_prompt([1, 2, 3, 4], 10)) is None
    assert spawn_join.prompt_budget("Token Budget: 1024 Moving to Node #0\n") is None
