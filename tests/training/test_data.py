"""Datasets: record formats, bad lines with their numbers, the split, prompt masking, batches."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.core.errors import InvalidInput, NotFound
from services.core.layout import datasets_dir
from services.training.data import (
    IGNORE_INDEX,
    Record,
    TokenizedExample,
    format_record,
    list_datasets,
    load_dataset,
    make_batches,
    split_dataset,
    tokenize_records,
    validation_count,
)
from services.training.models import discover_models, load_tokenizer
from services.training.sample_dataset import (
    DAYS,
    generate_sample_records,
    sample_dataset_bytes,
)


def write_lines(root: Path, dataset_id: str, lines: list[Any]) -> Path:
    """Write a dataset; str items are written verbatim, anything else as JSON."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{dataset_id}.jsonl"
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    path.write_text(text + "\n", encoding="utf-8")
    return path


GOOD = {"instruction": "Say hi.", "output": "hi"}


# --- record formats ----------------------------------------------------------------------


@pytest.mark.parametrize("prompt_key", ["instruction", "question", "prompt"])
@pytest.mark.parametrize("completion_key", ["output", "response", "completion"])
def test_every_instruction_form_uses_the_template(prompt_key: str, completion_key: str) -> None:
    prompt, completion = format_record({prompt_key: "Add 2 and 3.", completion_key: "5"})
    assert prompt == "### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    assert completion == "5"


def test_input_adds_an_input_block_and_a_blank_input_does_not() -> None:
    with_input = format_record({"instruction": "Reverse it.", "input": "abc", "output": "cba"})
    assert with_input == (
        "### Instruction:\nReverse it.\n\n### Input:\nabc\n\n### Response:\n",
        "cba",
    )
    blank = format_record({"instruction": "Reverse it.", "input": " ", "output": "cba"})
    assert blank[0] == "### Instruction:\nReverse it.\n\n### Response:\n"


def test_a_text_record_trains_on_every_token() -> None:
    assert format_record({"text": "Once upon a time."}) == ("", "Once upon a time.")


def test_unknown_extra_fields_are_ignored() -> None:
    assert format_record({**GOOD, "id": 7, "source": "x"}) == format_record(GOOD)


def test_format_record_names_the_problem_and_the_allowed_shapes() -> None:
    with pytest.raises(InvalidInput) as caught:
        format_record({"instruction": "x"})
    assert "no output/response/completion" in str(caught.value)
    assert "a record needs" in str(caught.value)
    assert caught.value.field == "datasetId"


def test_load_reads_all_forms_with_line_numbers_and_skips_blank_lines(tmp_path: Path) -> None:
    write_lines(
        tmp_path,
        "mixed",
        [
            {"question": "2+2?", "response": "4"},
            "",
            "   ",
            {"prompt": "Capital of France?", "input": "Answer in one word.", "completion": "Paris"},
            {"text": "plain text"},
        ],
    )
    dataset = load_dataset("mixed", tmp_path)
    assert [record.line for record in dataset.records] == [1, 4, 5]
    assert dataset.records[0] == Record(1, "### Instruction:\n2+2?\n\n### Response:\n", "4")
    assert "### Input:\nAnswer in one word.\n\n" in dataset.records[1].prompt
    assert dataset.records[2] == Record(5, "", "plain text")
    assert dataset.id == "mixed"


def test_sha256_is_of_the_file_bytes(tmp_path: Path) -> None:
    import hashlib

    path = write_lines(tmp_path, "two", [GOOD, GOOD])
    dataset = load_dataset("two", tmp_path)
    assert dataset.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert dataset.summary(train=1, validation=1) == {
        "id": "two",
        "sha256": dataset.sha256,
        "records": 2,
        "train_records": 1,
        "validation_records": 1,
    }


def test_crlf_line_endings_and_a_bom_are_accepted(tmp_path: Path) -> None:
    line = json.dumps(GOOD).encode()
    (tmp_path / "win.jsonl").write_bytes(b"\xef\xbb\xbf" + line + b"\r\n" + line + b"\r\n")
    assert len(load_dataset("win", tmp_path).records) == 2


# --- bad lines -----------------------------------------------------------------------------

BAD_LINES = [
    ('{"instruction": "x", "output": ', "is not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('"just a string"', "expected a JSON object, got str"),
    ({"instruction": "x"}, "no output/response/completion"),
    ({"output": "x"}, "no instruction/question/prompt"),
    ({"title": "x"}, "none of the record fields"),
    ({"instruction": 3, "output": "x"}, '"instruction" must be a string, got int'),
    ({"instruction": "x", "output": None}, '"output" must be a string, got NoneType'),
    ({"instruction": "  ", "output": "x"}, '"instruction" is empty'),
    ({"instruction": "x", "output": ""}, '"output" is empty'),
    ({"text": ""}, '"text" is empty'),
    ({"instruction": "x", "input": 5, "output": "y"}, '"input" must be a string'),
    ({"text": "t", "instruction": "x", "output": "y"}, 'both "text" and instruction, output'),
    ({"text": "t", "input": "x"}, 'both "text" and input'),
    ({"instruction": "x", "prompt": "y", "output": "z"}, "both instruction and prompt"),
    ({"instruction": "x", "output": "y", "response": "z"}, "both output and response"),
]


@pytest.mark.parametrize(("bad", "problem"), BAD_LINES)
def test_each_bad_line_kind_is_reported_with_its_line_number(
    tmp_path: Path, bad: Any, problem: str
) -> None:
    path = write_lines(tmp_path, "bad", [GOOD, "", bad, GOOD])
    with pytest.raises(InvalidInput) as caught:
        load_dataset("bad", tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{path} line 3: ")
    assert problem in message
    assert "a record needs instruction/question/prompt" in message
    assert "more bad line" not in message
    assert caught.value.field == "datasetId"


def test_every_bad_line_is_counted_and_the_first_is_named(tmp_path: Path) -> None:
    write_lines(tmp_path, "bad", [GOOD, {"text": 1}, GOOD, "{oops", "[]", GOOD])
    with pytest.raises(InvalidInput) as caught:
        load_dataset("bad", tmp_path)
    assert "line 2: " in str(caught.value)
    assert "(and 2 more bad lines)" in str(caught.value)


def test_a_line_that_is_not_utf8_is_reported(tmp_path: Path) -> None:
    line = json.dumps(GOOD).encode()
    (tmp_path / "latin.jsonl").write_bytes(line + b"\n" + b'{"text": "caf\xe9"}\n' + line + b"\n")
    with pytest.raises(InvalidInput, match=r"line 2: is not valid UTF-8"):
        load_dataset("latin", tmp_path)


def test_an_empty_dataset_and_a_single_record_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(InvalidInput, match="has no records"):
        load_dataset("empty", tmp_path)
    write_lines(tmp_path, "one", [GOOD])
    with pytest.raises(InvalidInput, match="at least 2 are needed"):
        load_dataset("one", tmp_path)


# --- finding datasets ----------------------------------------------------------------------


def test_unknown_dataset_lists_the_available_ones(tmp_path: Path) -> None:
    write_lines(tmp_path, "beta", [GOOD, GOOD])
    write_lines(tmp_path, "alpha", [GOOD, GOOD])
    with pytest.raises(NotFound) as caught:
        load_dataset("gamma", tmp_path)
    assert str(caught.value) == f"Dataset 'gamma' not found in {tmp_path}; available: alpha, beta"
    assert caught.value.field == "datasetId"


@pytest.mark.parametrize("bad_id", ["../sample", "a/b", "", ".hidden", "a..b", "x" * 129])
def test_ids_that_could_name_a_path_are_refused(tmp_path: Path, bad_id: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        load_dataset(bad_id, tmp_path)
    assert caught.value.field == "datasetId"


def test_a_symlink_out_of_the_datasets_dir_is_refused(tmp_path: Path) -> None:
    outside = write_lines(tmp_path / "elsewhere", "secret", [GOOD, GOOD])
    root = tmp_path / "datasets"
    root.mkdir()
    (root / "escape.jsonl").symlink_to(outside)
    with pytest.raises(InvalidInput, match="outside") as caught:
        load_dataset("escape", root)
    assert caught.value.field == "datasetId"
    assert list_datasets(root) == []


def test_a_symlink_inside_the_datasets_dir_is_fine(tmp_path: Path) -> None:
    write_lines(tmp_path, "real", [GOOD, GOOD])
    (tmp_path / "alias.jsonl").symlink_to(tmp_path / "real.jsonl")
    assert len(load_dataset("alias", tmp_path).records) == 2


def test_list_datasets_counts_lines_without_validating(tmp_path: Path) -> None:
    write_lines(tmp_path, "zeta", [GOOD, "", GOOD, GOOD])
    write_lines(tmp_path, "broken", ["{not json", GOOD])
    (tmp_path / "not a valid id.jsonl").write_text(json.dumps(GOOD))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "folder.jsonl").mkdir()
    infos = list_datasets(tmp_path)
    assert [(info.id, info.records) for info in infos] == [("broken", 2), ("zeta", 3)]
    assert infos[0].path == tmp_path / "broken.jsonl"
    assert list_datasets(tmp_path / "missing") == []


def test_datasets_dir_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATASETS_DIR", raising=False)
    assert datasets_dir() == Path("datasets")
    monkeypatch.setenv("DATASETS_DIR", "/data/sets")
    assert datasets_dir() == Path("/data/sets")


# --- the sample dataset --------------------------------------------------------------------


def test_sample_file_is_exactly_its_generators_output(sample_dataset_dir: Path) -> None:
    path = sample_dataset_dir / "sample.jsonl"
    assert path.read_bytes() == sample_dataset_bytes()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == generate_sample_records()


def test_sample_dataset_loads(sample_dataset_dir: Path) -> None:
    dataset = load_dataset("sample", sample_dataset_dir)
    assert len(dataset.records) >= 300
    assert any("### Input:" in record.prompt for record in dataset.records)
    assert any("### Input:" not in record.prompt for record in dataset.records)
    assert max(len(f"{r.prompt} {r.completion}".split()) for r in dataset.records) < 60


def test_the_generator_is_deterministic_and_seeded() -> None:
    assert generate_sample_records(0) == generate_sample_records(0)
    assert generate_sample_records(0) != generate_sample_records(1)


def _check(record: dict[str, str]) -> bool | None:
    """Recompute a sample record's answer independently; None when its kind is not known."""
    q, given, out = record["instruction"], record.get("input", ""), record["output"]
    quoted = re.search(r'"(\w+)"', q)
    numbers = [int(n) for n in re.findall(r"\d+", f"{q} {given}")]
    if m := re.fullmatch(r"What is (\d+) ([+-]|times) (\d+)\?", q):
        a, op, b = int(m[1]), m[2], int(m[3])
        return int(out) == {"+": a + b, "-": a - b, "times": a * b}[op]
    if q == "Add the two numbers.":
        return int(out) == sum(numbers)
    if m := re.fullmatch(r"Subtract (\d+) from (\d+)\.", q):
        return int(out) == int(m[2]) - int(m[1])
    if q == "Multiply the two numbers.":
        return int(out) == numbers[0] * numbers[1]
    if q.startswith("Which number is larger"):
        return int(out) == max(numbers)
    if q.startswith("Which number is smaller"):
        return int(out) == min(numbers)
    if q.startswith("Sort these numbers"):
        descending = "largest to smallest" in q
        return [int(n) for n in out.split(", ")] == sorted(numbers, reverse=descending)
    if q == "Reverse the letters of the word.":
        return out == given[::-1]
    if q.startswith("Spell the word") and quoted:
        return out.split("-") == list(quoted[1])
    if q.startswith("How many letters") and quoted:
        return int(out) == len(quoted[1])
    if q.startswith("Count the vowels"):
        return int(out) == len(re.findall("[aeiou]", given))
    if m := re.fullmatch(r"Convert (\d+) (meters?|kilometers?|centimeters?|minutes) to (\w+)\.", q):
        factor = {"meter": 100, "kilometer": 1000, "centimeter": 0.01, "minute": 1 / 60}
        value = int(m[1]) * factor[m[2].removesuffix("s")]
        return float(out.split()[0]) == value and out.split()[1].startswith(m[3][:-1])
    if m := re.fullmatch(r"How many (minutes|seconds) are in (\d+) (hours?|minutes?)\?", q):
        return out == f"{int(m[2]) * 60} {m[1]}"
    if "even or odd" in q:
        return out == ("even" if numbers[0] % 2 == 0 else "odd")
    if q == "Rewrite the sentence in uppercase.":
        return out == given.upper() and out != given
    if q.startswith("What is the plural of") and quoted:
        noun = quoted[1]
        return out in {noun + "s", noun + "es", noun[:-1] + "ies"} and out != noun + "ys"
    if m := re.fullmatch(r"What day (is|was) (\d+) days? (after|before) (\w+)\?", q):
        step = int(m[2]) if m[3] == "after" else -int(m[2])
        return out == DAYS[(DAYS.index(m[4]) + step) % 7]
    return None


def test_every_sample_record_is_true() -> None:
    records = generate_sample_records()
    results = [(_check(record), record) for record in records]
    unknown = [record for result, record in results if result is None]
    wrong = [record for result, record in results if result is False]
    assert unknown == []
    assert wrong == []
    assert len({record["instruction"].split()[0] for record in records}) >= 8  # varied


# --- the split -----------------------------------------------------------------------------


def make_records(count: int) -> list[Record]:
    return [Record(line=i + 1, prompt=f"p{i}", completion=f"c{i}") for i in range(count)]


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(min_value=2, max_value=400),
    split=st.floats(min_value=1e-6, max_value=0.999999),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_split_is_disjoint_complete_ordered_and_deterministic(
    count: int, split: float, seed: int
) -> None:
    records = make_records(count)
    train, validation = split_dataset(records, split, seed)
    assert len(validation) == min(max(1, round(count * split)), count - 1)
    assert len(train) >= 1 and len(validation) >= 1
    lines = [r.line for r in train] + [r.line for r in validation]
    assert sorted(lines) == list(range(1, count + 1))  # disjoint and complete
    assert [r.line for r in train] == sorted(r.line for r in train)
    assert [r.line for r in validation] == sorted(r.line for r in validation)
    assert split_dataset(records, split, seed) == (train, validation)


@given(count=st.integers(min_value=2, max_value=10_000), split=st.floats(0.001, 0.999))
def test_validation_count_bounds(count: int, split: float) -> None:
    held_out = validation_count(count, split)
    assert 1 <= held_out <= count - 1
    wanted = count * split
    if 1 <= wanted <= count - 1:
        assert abs(held_out - wanted) <= 0.5  # the nearest whole number
    else:
        assert held_out == (1 if wanted < 1 else count - 1)  # clamped to keep both parts


def test_the_seed_chooses_the_validation_records() -> None:
    records = make_records(100)
    assert split_dataset(records, 0.2, 1)[1] != split_dataset(records, 0.2, 2)[1]


@pytest.mark.parametrize("split", [0, 1, -0.1, 1.5, float("nan"), True])
def test_a_split_outside_zero_to_one_is_refused(split: float) -> None:
    with pytest.raises(InvalidInput) as caught:
        split_dataset(make_records(10), split, 0)
    assert caught.value.field == "validationSplit"


def test_one_record_cannot_be_split() -> None:
    with pytest.raises(InvalidInput, match="at least 2 records"):
        split_dataset(make_records(1), 0.5, 0)


# --- tokenization --------------------------------------------------------------------------


class CharTokenizer:
    """One token per character (its code point); enough to check the masking arithmetic."""

    def __init__(self, bos: int | None = 1, eos: int | None = 2) -> None:
        self.bos_token_id = bos
        self.eos_token_id = eos
        self.calls = 0

    def __call__(self, texts: list[str], **_: Any) -> dict[str, list[list[int]]]:
        self.calls += 1
        return {"input_ids": [[ord(c) for c in text] for text in texts]}


def tokenize_one(prompt: str, completion: str, limit: int, **kw: Any) -> TokenizedExample:
    tokenizer: Any = CharTokenizer(**kw)
    return tokenize_records([Record(1, prompt, completion)], tokenizer, limit)[0]


def test_prompt_tokens_are_masked_and_completion_plus_eos_trained() -> None:
    example = tokenize_one("ab", "xyz", 100)
    assert example.input_ids == (1, ord("a"), ord("b"), ord("x"), ord("y"), ord("z"), 2)
    assert example.labels == (-100, -100, -100, ord("x"), ord("y"), ord("z"), 2)


def test_without_bos_or_eos_nothing_is_added() -> None:
    example = tokenize_one("", "hi", 100, bos=None, eos=None)
    assert example.input_ids == example.labels == (ord("h"), ord("i"))


def test_the_tokenizer_is_called_once_per_side() -> None:
    tokenizer: Any = CharTokenizer()
    tokenize_records(make_records(50), tokenizer, 64)
    assert tokenizer.calls == 2
    assert tokenize_records([], tokenizer, 64) == []


@settings(max_examples=300, deadline=None)
@given(
    prompt=st.text(alphabet="abc", max_size=40),
    completion=st.text(alphabet="xyz", min_size=1, max_size=40),
    limit=st.integers(min_value=2, max_value=90),
    bos=st.booleans(),
)
def test_truncation_keeps_the_start_and_at_least_one_trained_token(
    prompt: str, completion: str, limit: int, bos: bool
) -> None:
    example = tokenize_one(prompt, completion, limit, bos=1 if bos else None)
    ids, labels = list(example.input_ids), list(example.labels)
    head = [1] if bos else []
    full = [*head, *map(ord, prompt), *map(ord, completion), 2]
    assert len(ids) == len(labels) <= limit
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert trained, "every example must train on something"
    # masked exactly up to the first completion token, trained tokens are the input tokens
    assert trained == list(range(trained[0], len(ids)))
    assert all(labels[i] == ids[i] for i in trained)
    assert [chr(i) for i in ids[trained[0] :] if i != 2] == list(completion[: len(trained)])
    assert ids[: len(head)] == head
    if len(full) <= limit:
        assert ids == full
    elif len(head) + len(prompt) < limit:
        assert ids == full[:limit]  # the start is kept
    else:
        kept_prompt = "".join(chr(i) for i in ids[len(head) : trained[0]])
        assert prompt.endswith(kept_prompt)  # the prompt lost its start instead
        assert len(ids) == limit


def test_max_seq_length_below_two_is_refused() -> None:
    with pytest.raises(InvalidInput) as caught:
        tokenize_one("a", "b", 1)
    assert caught.value.field == "maxSeqLength"


def test_masking_with_a_real_demo_tokenizer(demo_models_dir: Path) -> None:
    records = [
        Record(1, *format_record({"instruction": "Add 2 and 3.", "output": "5"})),
        Record(2, "", "plain text trains every token"),
    ]
    for info in discover_models(demo_models_dir):
        tokenizer = load_tokenizer(info)
        examples = tokenize_records(records, tokenizer, 256)
        for record, example in zip(records, examples, strict=True):
            prompt_ids = tokenizer(record.prompt, add_special_tokens=False)["input_ids"]
            masked = len(prompt_ids) + (tokenizer.bos_token_id is not None)
            assert example.labels[:masked] == (IGNORE_INDEX,) * masked
            assert example.labels[masked:] == example.input_ids[masked:]
            assert example.input_ids[-1] == tokenizer.eos_token_id
            trained = tokenizer.decode(list(example.input_ids[masked:-1]))
            assert trained.strip() == record.completion, info.name


# --- batches -------------------------------------------------------------------------------


def examples_of_lengths(*lengths: int) -> list[TokenizedExample]:
    return [
        TokenizedExample(
            input_ids=tuple(range(10, 10 + n)),
            labels=(IGNORE_INDEX,) * (n // 2) + tuple(range(10 + n // 2, 10 + n)),
        )
        for n in lengths
    ]


def test_batches_are_right_padded_to_their_own_longest_example() -> None:
    examples = examples_of_lengths(3, 5, 2, 4, 6)
    batches = make_batches(examples, 2, pad_token_id=0, shuffle_seed=None)
    assert [tuple(b.input_ids.shape) for b in batches] == [(2, 5), (2, 4), (1, 6)]
    first = batches[0]
    assert first.input_ids.tolist() == [[10, 11, 12, 0, 0], [10, 11, 12, 13, 14]]
    assert first.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert first.labels.tolist() == [[-100, 11, 12, -100, -100], [-100, -100, 12, 13, 14]]
    for batch in batches:
        assert batch.input_ids.dtype == batch.attention_mask.dtype == torch.int64
        assert batch.labels.dtype == torch.int64 and batch.input_ids.device.type == "cpu"
        assert batch.tokens == int(batch.attention_mask.sum())
        assert batch.target_tokens == int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
    assert first.tokens == 8 and first.target_tokens == 5
    assert sum(b.tokens for b in batches) == 3 + 5 + 2 + 4 + 6


@given(
    lengths=st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=30),
    batch_size=st.integers(min_value=1, max_value=8),
    seed=st.integers(min_value=0, max_value=1000),
)
def test_shuffled_batches_hold_every_example_once(
    lengths: list[int], batch_size: int, seed: int
) -> None:
    examples = examples_of_lengths(*lengths)
    batches = make_batches(examples, batch_size, pad_token_id=0, shuffle_seed=seed)
    assert len(batches) == -(-len(examples) // batch_size)
    assert all(b.input_ids.shape[0] == batch_size for b in batches[:-1])
    assert sorted(int(row.sum()) for b in batches for row in b.attention_mask) == sorted(lengths)
    again = make_batches(examples, batch_size, pad_token_id=0, shuffle_seed=seed)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(batches, again, strict=True))


def test_the_shuffle_seed_changes_the_order() -> None:
    examples = examples_of_lengths(*range(1, 21))
    one = make_batches(examples, 4, pad_token_id=0, shuffle_seed=1)
    two = make_batches(examples, 4, pad_token_id=0, shuffle_seed=2)
    assert [b.tokens for b in one] != [b.tokens for b in two]


@pytest.mark.parametrize("batch_size", [0, -1, True])
def test_a_batch_size_below_one_is_refused(batch_size: int) -> None:
    with pytest.raises(InvalidInput) as caught:
        make_batches(examples_of_lengths(2), batch_size, pad_token_id=0, shuffle_seed=None)
    assert caught.value.field == "batchSize"


def test_the_first_position_never_counts_as_a_target() -> None:
    # the model predicts token t from tokens < t, so a trained label at position 0 has no loss
    example = TokenizedExample(input_ids=(5, 6, 7), labels=(5, 6, 7))
    (batch,) = make_batches([example], 1, pad_token_id=0, shuffle_seed=None)
    assert batch.target_tokens == 2
    assert batch.tokens == 3
