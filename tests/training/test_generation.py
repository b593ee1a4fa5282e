"""The parts of generation that need no server: text released as tokens arrive (whole
characters, never a stop text), seeded sampling, the model cache's bound, and the checks of a
request. The streaming itself is tested through the real service in tests/e2e/test_generate.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.api import training_pb2
from services.api.generate_request import (
    check_generate,
    generate_body,
    read_generate_request,
    to_generate_request,
)
from services.api.run_config import build_config
from services.core.errors import Conflict, InvalidInput
from services.training.generation import ModelCache, SeededSampler, TextStream, _coalesce
from services.training.trained import TrainedSource


class ByteTokenizer:
    """Each token is one UTF-8 byte: a character of several bytes spans several tokens."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def _stream(text: str, stop: tuple[str, ...] = (), split: int = 1) -> tuple[list[str], TextStream]:
    stream = TextStream(ByteTokenizer(), stop)
    data = list(text.encode())
    pieces = [stream.push(data[i : i + split]) for i in range(0, len(data), split)]
    pieces.append(stream.finish())
    return [p for p in pieces if p], stream


def test_pieces_are_whole_characters_and_add_up_to_the_text() -> None:
    text = "añb€c😀d"
    pieces, stream = _stream(text)
    assert "".join(pieces) == text == stream.answer
    assert all("\ufffd" not in piece for piece in pieces)
    assert len(pieces) == len(text)  # each character as soon as its last byte came


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40),
    st.lists(st.text(min_size=1, max_size=4), max_size=3),
    st.integers(1, 4),
)
def test_an_answer_ends_before_its_first_stop_text(text: str, stops: list[str], split: int) -> None:
    pieces, stream = _stream(text, tuple(stops), split)
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = text[: min(found)] if found else text
    assert "".join(pieces) == expected == stream.answer
    assert stream.stopped == bool(found)


def test_a_possible_stop_text_is_held_back_until_it_is_not_one() -> None:
    stream = TextStream(ByteTokenizer(), ("END",))
    assert stream.push(list(b"abcE")) == "abc"  # "E" may start END
    assert stream.push(list(b"N")) == ""
    assert stream.push(list(b"x")) == "ENx"  # it did not
    assert stream.push(list(b"END more")) == ""
    assert stream.stopped and stream.answer == "abcENx"


def test_sampling_is_one_answer_per_seed_and_keeps_to_top_p() -> None:
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))

    def draws(seed: int, top_p: float, n: int = 400) -> list[int]:
        sampler = SeededSampler(1.0, top_p, seed, torch.device("cpu"))
        out = []
        for _ in range(n):
            chosen = sampler(torch.zeros(1, 1, dtype=torch.long), scores)
            assert torch.isinf(chosen).sum() == 3  # one token left for the greedy step
            out.append(int(chosen.argmax()))
        return out

    assert draws(3, 1.0) == draws(3, 1.0)
    assert draws(3, 1.0) != draws(4, 1.0)
    assert set(draws(5, 0.75)) == {0, 1}  # 0.5 + 0.3 reach 0.75: the rest never come
    assert set(draws(5, 0.01)) == {0}  # the likeliest token always stays
    counts = draws(6, 1.0, 2000)
    assert abs(counts.count(0) / 2000 - 0.5) < 0.05


def test_low_temperature_sharpens_towards_the_likeliest() -> None:
    scores = torch.log(torch.tensor([[0.4, 0.35, 0.25]]))
    sampler = SeededSampler(0.01, 1.0, 0, torch.device("cpu"))
    picks = [int(sampler(torch.zeros(1, 1, dtype=torch.long), scores).argmax()) for _ in range(200)]
    assert picks.count(0) > 190


class Loaded:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


def _source(tmp_path: Path, model: str) -> TrainedSource:
    config = build_config({"dataset_id": "d", "base_models": [model]})
    return TrainedSource(tmp_path, model, tmp_path, config, {}, {})


def test_the_cache_keeps_the_recently_used_within_its_bound(tmp_path: Path) -> None:
    loads: list[str] = []
    sizes = {"a": 40, "b": 40, "c": 40, "huge": 200}

    def loader(source: TrainedSource) -> Any:
        loads.append(source.model)
        return Loaded(sizes[source.model])

    cache = ModelCache(100, loader)
    cached = []
    for name in ("a", "b", "a", "c"):  # c pushes out b, the least recently used
        with cache.use(_source(tmp_path, name)) as (_, hit):
            cached.append(hit)
    assert cached == [False, False, True, False]
    assert [key[1] for key in cache.models()] == ["a", "c"]
    assert loads == ["a", "b", "c"]
    in_use = (cache.use(_source(tmp_path, name)) for name in "acb")
    with next(in_use), next(in_use), next(in_use):  # all three in use: none is evicted meanwhile
        assert cache.held == 120
    assert cache.held <= 100  # once idle, back within the bound
    with pytest.raises(Conflict, match="generate-cache-gib"), cache.use(_source(tmp_path, "huge")):
        pass


def test_adjacent_pieces_of_a_model_travel_as_one() -> None:
    def piece(model: str, text: str, count: int) -> training_pb2.GenerateEvent:
        token = training_pb2.GeneratedText(text=text, completion_tokens=count)
        return training_pb2.GenerateEvent(model=model, token=token)

    done = training_pb2.GenerateEvent(model="a", done=training_pb2.GenerationDone(text="xyz"))
    batch: list[Any] = [
        piece("a", "x", 1),
        piece("a", "y", 2),
        piece("b", "q", 1),
        piece("a", "z", 3),
        done,
        None,
    ]
    merged = list(_coalesce(batch))
    assert [(e.model, e.token.text, e.token.completion_tokens) for e in merged[:3]] == [
        ("a", "xy", 2),
        ("b", "q", 1),
        ("a", "z", 3),
    ]
    assert merged[3] is done and merged[4] is None


# ---- the request's checks ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"prompt": "x" * 100_001}, "prompt"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "messages"),
        ({"messages": [{"role": "robot", "content": "y"}]}, "messages"),
        (
            {"messages": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "z"}]},
            "messages",
        ),
        ({"messages": [{"role": "user", "content": "y", "name": "n"}]}, "messages"),
        ({"prompt": "x", "max_new_tokens": 0}, "maxNewTokens"),
        ({"prompt": "x", "max_new_tokens": 4097}, "maxNewTokens"),
        ({"prompt": "x", "max_new_tokens": 2.0}, "maxNewTokens"),
        ({"prompt": "x", "temperature": float("nan")}, "temperature"),
        ({"prompt": "x", "temperature": 2.5}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "topP"),
        ({"prompt": "x", "top_p": 1.5}, "topP"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "seed": True}, "seed"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "stop": ["x" * 65]}, "stop"),
        ({"prompt": "x", "models": ["a", "a"]}, "models"),
        ({"prompt": "x", "models": "a"}, "models"),
        ({"prompt": "x", "models": ["../up"]}, "models"),
        ({"prompt": "x", "colour": "red"}, "colour"),
    ],
)
def test_bad_values_are_refused_naming_the_field(values: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        check_generate(values)
    assert caught.value.field == field, caught.value


def test_a_request_reads_back_as_it_was_checked() -> None:
    spec = check_generate(
        generate_body(
            {"prompt": "hi", "models": ["m1", "m2"], "maxNewTokens": 7, "topP": 0.5,
             "temperature": 0.7, "seed": 9, "stop": "\n"}
        )
    )  # fmt: skip
    assert spec.stop == ("\n",) and spec.max_new_tokens == 7 and not spec.greedy
    assert read_generate_request(to_generate_request("run-20260101-000000", spec)) == spec
    bare = read_generate_request(training_pb2.GenerateRequest(prompt="hi"))
    assert bare.greedy and bare.max_new_tokens == 128 and bare.top_p == 1.0 and bare.models == ()
    with pytest.raises(InvalidInput) as caught:
        generate_body({"prompt": "x", "max_new_tokens": 3})  # the body is camelCase
    assert caught.value.field == "max_new_tokens"
