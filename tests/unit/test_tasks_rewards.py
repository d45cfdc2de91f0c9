from __future__ import annotations

import json
import re

import pytest

from rollfleet.rewards import (
    REWARDS,
    compose,
    countdown,
    exact_match,
    format_reward,
    numeric,
    register_reward,
    score,
)
from rollfleet.tasks import TASKS, make_task
from rollfleet.tasks.countdown import eval_expression, verify

# --- registry -------------------------------------------------------------------------


def test_task_registry_and_unknown_task():
    assert sorted(TASKS) == [
        "calculator",
        "chain_sum",
        "countdown",
        "jsonl",
        "mixed",
        "qagent",
        "recgpt",
        "recommend",
        "solve",
    ]
    with pytest.raises(
        ValueError,
        match=r"unknown task 'chess'.*\['calculator', 'chain_sum', 'countdown', 'jsonl', 'mixed', 'qagent', 'recgpt', 'recommend', 'solve'\]",
    ):
        make_task("chess")


# --- countdown ------------------------------------------------------------------------


def test_countdown_is_deterministic_in_seed_split_index():
    a, b = make_task("countdown", seed=0), make_task("countdown", seed=0)
    for split in ("train", "heldout"):
        for index in (0, 1, 17, 199):
            assert a.example(split, index) == b.example(split, index)
    # asking out of order does not change an example (no hidden cursor)
    assert a.example("train", 5) == make_task("countdown", seed=0).example("train", 5)
    other = make_task("countdown", seed=1)
    assert [a.example("train", i).prompt for i in range(20)] != [
        other.example("train", i).prompt for i in range(20)
    ]
    assert [a.example("heldout", i).prompt for i in range(20)] != [
        other.example("heldout", i).prompt for i in range(20)
    ]


def test_countdown_prompt_format_and_meta():
    task = make_task("countdown", {"numbers": 3, "max_number": 9}, seed=0)
    for index in range(50):
        ex = task.example("train", index)
        numbers, target = ex.meta["numbers"], ex.meta["target"]
        assert len(numbers) == 3
        assert numbers == sorted(numbers)
        assert all(1 <= n <= 9 for n in numbers)
        assert 0 <= target <= 99
        assert ex.prompt == " ".join(map(str, numbers)) + f">{target}:"
        assert ex.answer == str(target)
        assert ex.id == f"countdown-train-{index}"


def test_countdown_few_shot_prompts_start_with_the_same_solved_problems():
    plain = make_task("countdown", {}, seed=0)
    shots = make_task("countdown", {"few_shot": 8}, seed=0)
    preamble = shots.example("train", 0).prompt.removesuffix(plain.example("train", 0).prompt)
    assert preamble.count(";") == 8 and preamble.endswith(";")
    for split in ("train", "heldout"):
        for index in range(20):
            ex, base = shots.example(split, index), plain.example(split, index)
            assert ex.prompt == preamble + base.prompt  # the same preamble everywhere
            assert (ex.meta, ex.demonstration) == (base.meta, base.demonstration)
    for shot in preamble.rstrip(";").split(";"):  # each shot is a solved train problem
        problem, expr = shot.split(":")
        numbers, target = problem.split(">")
        assert verify(expr, [int(n) for n in numbers.split()], int(target))
    # the long-prompt workload: the prompt is at least 8x the 12 new tokens of the job
    assert min(len(shots.example("train", i).prompt) for i in range(20)) >= 8 * 12


def test_countdown_heldout_is_a_fixed_slice_of_the_problem_space():
    task = make_task("countdown", seed=0)
    assert task.size("heldout") == 500
    assert task.size("train") is None
    heldout = [task.example("heldout", i) for i in range(500)]
    train = [task.example("train", i) for i in range(2000)]
    assert all(task.split_of(ex.meta["numbers"], ex.meta["target"]) == "heldout" for ex in heldout)
    assert all(task.split_of(ex.meta["numbers"], ex.meta["target"]) == "train" for ex in train)
    # about heldout_percent (10%) of distinct problems are held out
    distinct = {(tuple(ex.meta["numbers"]), ex.meta["target"]) for ex in heldout + train}
    share = sum(task.split_of(list(n), t) == "heldout" for n, t in distinct) / len(distinct)
    assert 0.04 < share < 0.2


def test_countdown_train_never_yields_a_heldout_problem():
    task = make_task("countdown", seed=0)
    heldout = {
        (tuple(ex.meta["numbers"]), ex.meta["target"])
        for ex in (task.example("heldout", i) for i in range(task.size("heldout")))
    }
    for index in range(2000):
        ex = task.example("train", index)
        assert (tuple(ex.meta["numbers"]), ex.meta["target"]) not in heldout, index


def test_countdown_demonstrations_verify():
    task = make_task("countdown", seed=0)
    for split, count in (("train", 200), ("heldout", 200)):
        for index in range(count):
            ex = task.example(split, index)
            ((speaker, text),) = ex.demonstration
            assert speaker == "model"
            assert verify(text, ex.meta["numbers"], ex.meta["target"]), (split, index, text)
            assert countdown(text, ex.answer, ex.meta) == 1.0


def test_countdown_rejects_too_few_numbers():
    with pytest.raises(ValueError, match="numbers must be at least 2"):
        make_task("countdown", {"numbers": 1})


@pytest.mark.parametrize(
    ("expr", "value"),
    [
        ("7", 7),
        ("2+3*4", 14),
        ("2*3+4", 10),
        ("(2+3)*4", 20),
        ("2*(3+4)*5", 70),
        ("10-2-3", 5),  # left-associative
        ("2-3*4", -10),
        ("((7))", 7),
        ("8-(3-1)", 6),
        ("12*34", 408),
    ],
)
def test_eval_expression(expr, value):
    assert eval_expression(expr) == value


@pytest.mark.parametrize(
    "expr", ["", "2+", "+2", "(2+3", "2+3)", "2**3", "a", "2 + 3", "2/3", "-3", "1" * 65]
)
def test_eval_expression_malformed_raises(expr):
    with pytest.raises(ValueError):
        eval_expression(expr)


def test_verify():
    numbers, target = [3, 5, 7], 22
    assert verify("3*5+7", numbers, target)
    assert verify("7+5*3", numbers, target)
    assert verify(" 7+3*5 \n", numbers, target)  # surrounding whitespace is fine
    assert not verify("3*5+7+0", numbers, target)  # extra number
    assert not verify("7+5+5+5", numbers, target)  # reuses 5, misses 3
    assert not verify("15+7", numbers, target)  # right value, wrong numbers
    assert not verify("3*7+1", numbers, target)  # right value, 1 is not given
    assert not verify("3*5", numbers, 15)  # misses 7
    assert not verify("3+5+7", numbers, target)  # uses the numbers, wrong value
    assert not verify("3*5+7=22", numbers, target)  # not an expression
    assert not verify("", numbers, target)


# --- jsonl ----------------------------------------------------------------------------


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_holds_out_last_rows_and_cycles(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": i * 2} for i in range(10)]
    path = _write_rows(tmp_path / "data.jsonl", rows)
    task = make_task("jsonl", {"path": str(path)})
    assert task.size("train") == 9
    assert task.size("heldout") == 1
    assert task.example("heldout", 0).prompt == "q9"
    assert task.example("heldout", 0).answer == "18"  # answers become strings
    assert task.example("train", 3).prompt == "q3"
    assert task.example("train", 3).demonstration == (("model", "6"),)
    # the train split cycles epoch after epoch
    assert task.example("train", 9).prompt == "q0"
    assert task.example("train", 9).id == "jsonl-train-0"
    assert task.default_reward == "exact_match"


def test_jsonl_fraction_blank_lines_fields_and_demonstration(tmp_path):
    path = tmp_path / "custom.jsonl"
    lines = [json.dumps({"q": f"p{i}", "a": f"x{i}", "demonstration": f"d{i}"}) for i in range(8)]
    path.write_text("\n\n".join(lines) + "\n\n", encoding="utf-8")  # blank lines are skipped
    task = make_task(
        "jsonl",
        {"path": str(path), "heldout_fraction": 0.25, "prompt_field": "q", "answer_field": "a"},
    )
    assert task.size("train") == 6
    assert [task.example("heldout", i).prompt for i in range(2)] == ["p6", "p7"]
    assert task.example("train", 1).answer == "x1"
    assert task.example("train", 1).demonstration == (("model", "d1"),)


def test_jsonl_heldout_path(tmp_path):
    train = _write_rows(tmp_path / "train.jsonl", [{"prompt": "a", "answer": "1"}])
    test = _write_rows(
        tmp_path / "test.jsonl", [{"prompt": "b", "answer": "2"}, {"prompt": "c", "answer": "3"}]
    )
    task = make_task("jsonl", {"path": str(train), "heldout_path": str(test)})
    assert task.size("train") == 1
    assert task.size("heldout") == 2
    assert task.example("heldout", 1).prompt == "c"


def test_jsonl_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError) as info:
        make_task("jsonl", {"path": str(missing)})
    assert str(missing) in str(info.value)


def test_jsonl_missing_field_names_field_and_line(tmp_path):
    path = _write_rows(
        tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "solution": "2"}]
    )
    with pytest.raises(ValueError) as info:
        make_task("jsonl", {"path": str(path)})
    message = str(info.value)
    assert "'answer'" in message
    assert f"{path}:2" in message
    assert "answer_field" in message


def test_jsonl_errors_without_path_bad_json_or_nothing_to_hold_out(tmp_path):
    with pytest.raises(ValueError, match=r"task\.params\.path: the jsonl task needs"):
        make_task("jsonl", {})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "1"}\n{not json\n')
    with pytest.raises(ValueError, match=re.escape(f"{bad}:2: not valid JSON")):
        make_task("jsonl", {"path": str(bad)})
    one = _write_rows(tmp_path / "one.jsonl", [{"prompt": "a", "answer": "1"}])
    with pytest.raises(ValueError, match="nothing to hold out"):
        make_task("jsonl", {"path": str(one)})


def test_jsonl_task_reads_parquet_files(tmp_path):
    """Users' datasets are usually Parquet: the same task reads it, by the suffix."""
    import pyarrow
    import pyarrow.parquet

    rows = [{"prompt": f"q{i}", "answer": i, "source": "gsm"} for i in range(6)]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "train.parquet")
    heldout = _write_rows(tmp_path / "test.jsonl", [{"prompt": "t", "answer": "7"}])
    task = make_task(
        "jsonl", {"path": str(tmp_path / "train.parquet"), "heldout_path": str(heldout)}
    )
    assert [task.example("train", i).prompt for i in range(6)] == [f"q{i}" for i in range(6)]
    assert task.example("train", 4).answer == "4" and task.example("heldout", 0).answer == "7"
    not_parquet = _write_rows(tmp_path / "rows.parquet", [{"prompt": "a", "answer": "1"}])
    with pytest.raises(
        ValueError, match=r"task\.params\.path: .*rows\.parquet: not a Parquet file"
    ):
        make_task("jsonl", {"path": str(not_parquet)})


def test_jsonl_task_reads_fsspec_urls(tmp_path):
    import fsspec
    import pyarrow
    import pyarrow.parquet

    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(5)]
    local = _write_rows(tmp_path / "train.jsonl", rows)
    with fsspec.open("memory://bucket/test.parquet", "wb") as f:  # an object store in memory
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows[:2]), f)
    task = make_task(
        "jsonl", {"path": f"file://{local}", "heldout_path": "memory://bucket/test.parquet"}
    )
    assert task.size("train") == 5 and task.size("heldout") == 2
    assert task.example("heldout", 1).prompt == "q1"


@pytest.mark.parametrize(
    ("url", "error", "message"),
    [
        (
            "s3://bucket/train.jsonl",
            ValueError,
            r"task\.params\.path: s3://bucket/train\.jsonl needs the fsspec filesystem for s3://",
        ),
        (
            "nosuch://bucket/train.jsonl",
            ValueError,
            r"task\.params\.path: nosuch://bucket/train\.jsonl cannot be opened",
        ),
        (
            "memory://bucket/missing.jsonl",
            FileNotFoundError,
            r"task\.params\.path: memory://bucket/missing\.jsonl does not exist",
        ),
    ],
)
def test_a_bad_task_url_fails_naming_the_field(url, error, message):
    with pytest.raises(error, match=message):
        make_task("jsonl", {"path": url})


# --- calculator -----------------------------------------------------------------------


def test_calculator_env_step():
    task = make_task("calculator")
    meta = task.example("train", 0).meta
    assert meta == {"max_turns": 3}
    assert task.env_step(meta, 0, "c12*34;") == ("=408;", False)
    assert task.env_step(meta, 1, "c(1+2)*3;") == ("=9;", False)
    assert task.env_step(meta, 0, "c12*;") == ("=error;", False)
    # the last allowed turn ends the episode even on a tool call
    assert task.env_step(meta, 2, "c1+1;") == ("=2;", True)
    assert task.env_step({"max_turns": 5}, 2, "c1+1;") == ("=2;", False)
    # anything that is not a tool call is the final answer
    assert task.env_step(meta, 0, "a413") == ("", True)
    assert task.env_step(meta, 1, "c12*34") == ("", True)  # no closing ;


def test_calculator_observation_pad_lengthens_every_tool_answer():
    task = make_task("calculator", {"observation_pad": 5})
    ex = task.example("train", 0)
    assert ex.demonstration[1][1].startswith("#####=")
    assert task.env_step(ex.meta, 0, "c2*3;") == ("#####=6;", False)
    with pytest.raises(ValueError, match="observation_pad must not be negative"):
        make_task("calculator", {"observation_pad": -1})


MIX = [{"name": "calculator", "weight": 1}, {"name": "countdown", "weight": 3}]


def test_mixed_draws_each_example_from_one_task_and_keeps_its_parts():
    task = make_task("mixed", {"tasks": MIX}, seed=1)
    examples = [task.example("train", i) for i in range(400)]
    kinds = [ex.meta["kind"] for ex in examples]
    assert 0.65 < kinds.count("countdown") / len(kinds) < 0.85  # weights 1 : 3
    verifiers = {"calculator": "numeric", "countdown": "countdown"}
    for index, ex in enumerate(examples[:50]):
        inner = make_task(ex.meta["kind"], seed=1).example("train", index)
        assert (ex.prompt, ex.answer, ex.demonstration) == (
            inner.prompt,
            inner.answer,
            inner.demonstration,
        )
        assert ex.meta["verifier"] == verifiers[ex.meta["kind"]]
        assert task.is_multi_turn(ex) == (ex.meta["kind"] == "calculator")
        assert ex.meta["turn_stop"] == ([";"] if ex.meta["kind"] == "calculator" else [])
    assert task.example("heldout", 7) == make_task("mixed", {"tasks": MIX}, seed=1).example(
        "heldout", 7
    )
    assert task.size("heldout") == 200 and task.turn_stop == (";",)
    calc = next(ex for ex in examples if ex.meta["kind"] == "calculator")
    a, b = calc.prompt.split("*")[0], calc.prompt.split("*")[1].split("+")[0]
    env = task.open_env(calc.meta)
    assert env.step(f"c{a}*{b};") == (f"={int(a) * int(b)};", False, {})
    # Each example is scored by its own task's verifier.
    assert (
        score("mixed", {"response": f"a{calc.answer}", "answer": calc.answer, "meta": calc.meta})
        == 1
    )
    count = next(ex for ex in examples if ex.meta["kind"] == "countdown")
    assert (
        score(
            "mixed",
            {"response": count.demonstration[-1][1], "answer": count.answer, "meta": count.meta},
        )
        == 1
    )
    assert score("mixed", {"response": "1+1", "answer": count.answer, "meta": count.meta}) == 0


@pytest.mark.parametrize(
    "params, message",
    [
        ({}, r"task.params.tasks: list the tasks to mix"),
        ({"tasks": [{"name": "chess"}]}, r"tasks\[0\].name: 'chess' is not a task to mix"),
        (
            {"tasks": [{"name": "countdown"}, {"name": "countdown"}]},
            r"tasks\[1\].name: 'countdown' is listed twice",
        ),
        (
            {"tasks": [{"name": "countdown", "weight": 0}]},
            r"tasks\[0\].weight: must be a positive number",
        ),
        (
            {"tasks": [{"name": "countdown", "size": 3}]},
            r"tasks\[0\]: expected \{name, params, weight\}",
        ),
    ],
)
def test_mixed_refuses_a_bad_mix_naming_the_entry(params, message):
    with pytest.raises(ValueError, match=message):
        make_task("mixed", params)


def test_calculator_examples_and_demonstrations():
    task = make_task("calculator", seed=0)
    assert task.multi_turn
    assert task.turn_stop == (";",)
    assert task.default_reward == "numeric"
    assert task.size("heldout") == 200
    for split in ("train", "heldout"):
        for index in range(100):
            ex = task.example(split, index)
            match = re.fullmatch(r"(\d\d)\*(\d\d)\+(\d)\?", ex.prompt)
            assert match, ex.prompt
            a, b, c = map(int, match.groups())
            assert a % 2 == (1 if split == "train" else 0)  # the splits never overlap
            assert ex.answer == str(a * b + c)
            assert ex.demonstration == (
                ("model", f"c{a}*{b};"),
                ("env", f"={a * b};"),
                ("model", f"a{a * b + c}"),
            )
            # replaying the demonstration through the env gives the env turn and ends
            assert task.env_step(ex.meta, 0, f"c{a}*{b};") == (f"={a * b};", False)
            assert task.env_step(ex.meta, 1, f"a{a * b + c}") == ("", True)
    assert task.example("train", 3) == make_task("calculator", seed=0).example("train", 3)


def test_single_turn_tasks_have_no_env_step():
    with pytest.raises(NotImplementedError, match="single-turn"):
        make_task("countdown").env_step({}, 0, "c1;")


# --- rewards --------------------------------------------------------------------------


def test_reward_registry():
    assert {"exact_match", "numeric", "countdown", "format"} <= set(REWARDS)


def test_exact_match():
    assert exact_match(" 22\n", "22", {}) == 1.0
    assert exact_match("22", " 22 ", {}) == 1.0
    assert exact_match(" 22", "22", {}, strip=False) == 0.0
    assert exact_match("23", "22", {}) == 0.0


def test_numeric_uses_last_number():
    assert numeric("c12*34;=408;a413", "413", {}) == 1.0
    assert numeric("a413", "413.0", {}) == 1.0
    assert numeric("about 2.5", "2.5", {}) == 1.0
    assert numeric("413 then 12", "413", {}) == 0.0  # the last number counts
    assert numeric("-7", "-7", {}) == 1.0
    assert numeric("no digits", "1", {}) == 0.0
    assert numeric("5", "five", {}) == 0.0  # non-numeric answer
    assert numeric("1.05", "1", {}, tolerance=0.1) == 1.0
    assert numeric("1.05", "1", {}) == 0.0


def test_countdown_reward():
    meta = {"numbers": [3, 5, 7], "target": 22}
    assert countdown("3*5+7", "22", meta) == 1.0
    assert countdown("3+5+7", "22", meta) == 0.0
    assert countdown("garbage", "22", meta) == 0.0
    assert countdown("3*5+7", "22", {"numbers": [3, 5, 7], "target": "22"}) == 1.0


def test_format_reward():
    assert format_reward("3*5+7", "", {}) == 1.0
    assert format_reward(" (3+5)*7 ", "", {}) == 1.0
    assert format_reward("3*5+7=22", "", {}) == 0.0
    assert format_reward("abc", "", {}) == 0.0
    assert format_reward("abc", "", {}, pattern="[a-c]+") == 1.0


def item(response: str, answer: str, meta: dict) -> dict:
    return {"response": response, "answer": answer, "meta": meta}


def test_compose_weights_parts():
    meta = {"numbers": [3, 5, 7], "target": 22}
    functions = [("countdown", 1.0, {}), ("format", 0.25, {})]
    assert compose(functions, item("3*5+7", "22", meta)) == (
        1.25,
        {"countdown": 1.0, "format": 1.0},
    )
    assert compose(functions, item("3+5+7", "22", meta)) == (
        0.25,
        {"countdown": 0.0, "format": 1.0},
    )
    assert compose(functions, item("hello", "22", meta)) == (0.0, {"countdown": 0.0, "format": 0.0})
    total, parts = compose([("exact_match", -2.0, {"strip": False})], item(" 22", "22", {}))
    assert (total, parts) == (0.0, {"exact_match": 0.0})
    total, _ = compose([("exact_match", -2.0, {})], item(" 22", "22", {}))
    assert total == -2.0


def test_compose_same_function_twice_with_different_params():
    functions = [("format", 1.0, {"pattern": "a+"}), ("format", 2.0, {"pattern": "b+"})]
    total, parts = compose(functions, item("aaa", "", {}))
    assert total == 1.0  # 1.0 * 1 + 2.0 * 0
    assert parts == {"format": 1.0, "format#2": 0.0}


def test_a_reward_function_gets_the_episode_fields_it_declares():
    seen = {}

    @register_reward("test_length_aware")
    def length_aware(response, answer, meta, response_tokens, scale: float = 1.0):
        seen["tokens"] = response_tokens
        return scale / response_tokens

    try:
        scored = {**item("abc", "", {}), "response_tokens": 4, "turns": [{"role": "model"}]}
        assert compose([("test_length_aware", 1.0, {"scale": 2.0})], scored) == (
            0.5,
            {"test_length_aware": 0.5},
        )
        assert seen == {"tokens": 4}
        # A function that does not declare the episode's fields never sees them.
        assert compose([("format", 1.0, {"pattern": "a+"})], scored)[0] == 0.0
    finally:
        REWARDS.pop("test_length_aware")


def test_countdown_padding_gives_long_tailed_demonstrations():
    plain = make_task("countdown", {}, 0)
    padded = make_task("countdown", {"pad_tail": 1.2, "pad_max": 40}, 0)
    dots = []
    for i in range(400):
        a, b = plain.example("train", i), padded.example("train", i)
        assert a.prompt == b.prompt and a.meta == b.meta  # the same problems
        text = b.demonstration[0][1]
        assert text.rstrip(".") == a.demonstration[0][1]
        dots.append(len(text) - len(text.rstrip(".")))
    dots.sort()
    assert dots[len(dots) // 2] <= 4  # most answers are short ...
    assert dots[-1] == 40 and dots[int(0.9 * len(dots))] >= 15  # ... a tail runs long
    assert verify("3*5+7....", [3, 5, 7], 22) and not verify("....", [3, 5, 7], 22)
