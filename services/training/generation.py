"""Trying a finished run's models: each answers one prompt through transformers' own
`generate`, its tokens streamed as they come, every model at once.

- `TextStream` turns token ids into whole characters as they arrive and ends the answer before
  a stop text (held back until it cannot be the start of one).
- `SeededSampler` samples (temperature, top-p) from a generator of the request's own, so one
  seed gives one answer even while other requests sample beside it; temperature 0 uses no
  sampler at all and is exactly `model.generate(..., do_sample=False)`.
- `ModelCache` keeps loaded models, least recently used first out, within a byte bound.
- `Generator` runs each model's generation in a thread of its own pool (never on the event
  loop, never in a run's worker) and merges their events into one async stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.api import training_pb2
from services.api.generate_request import GenerateSpec, chat_turns
from services.core.errors import Conflict, InvalidInput, OneSeekError, TooSlow
from services.core.training_config import TRAINING_CONFIG
from services.training.trained import TrainedModel, TrainedSource, load_trained, locate

log = logging.getLogger("oneseek.training.generation")

_LIMITS = TRAINING_CONFIG["generation"]
PIECE_INTERVAL = 0.05
"""Seconds between two text pieces of one model sent to a client (the first goes at once)."""
Emit = Callable[[training_pb2.GenerateEvent], None]


# ---- text as it is generated -----------------------------------------------------------------


class TextStream:
    """The answer's text from its token ids, piece by piece: a piece is released once its
    tokens decode to whole characters and it cannot be the start of a stop text."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""
        """Everything decoded so far, held-back characters included."""
        self.sent = 0
        """How many characters of `text` were released."""
        self.stopped = False
        self._prefix = self._read = 0

    def push(self, token_ids: Sequence[int]) -> str:
        """Takes new token ids; returns the text they release (maybe empty)."""
        if self.stopped:
            return ""
        self.ids.extend(token_ids)
        # decode from a little before the new tokens: a tokenizer may need the context to place
        # a space, and a character split across tokens shows as U+FFFD until it is whole
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self.ids[self._prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release()

    def finish(self) -> str:
        """Whatever is still held back, at the end of the answer."""
        if self.stopped:
            return ""
        piece, self.sent = self.text[self.sent :], len(self.text)
        return piece

    def _release(self) -> str:
        text, sent = self.text, self.sent
        found = [i for i in (text.find(s, sent) for s in self.stop) if i >= 0]
        if found:
            end, self.stopped = min(found), True
        else:
            end = len(text) - self._held(text[sent:])
        piece, self.sent = text[sent:end], end
        return piece

    def _held(self, tail: str) -> int:
        """How many trailing characters might begin a stop text."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(tail)), longest, -1):
                if tail.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    @property
    def answer(self) -> str:
        return self.text[: self.sent]


class SeededSampler:
    """A logits processor that samples the next token itself (temperature, then top-p) with a
    generator of its own, and hands `generate` a distribution with that one token left: the
    greedy step that follows picks it. One seed, one answer, whatever else samples meanwhile."""

    def __init__(self, temperature: float, top_p: float, seed: int, device: torch.device) -> None:
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            ordered, order = torch.sort(probs, descending=True, dim=-1)
            before = torch.cumsum(ordered, dim=-1) - ordered  # mass of the likelier tokens
            ordered = ordered.masked_fill(before >= self.top_p, 0.0)  # the first always stays
            probs = torch.zeros_like(probs).scatter_(-1, order, ordered)
        choice = torch.multinomial(probs, num_samples=1, generator=self.generator)
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(-1, choice, 0.0)


class _Streamer:
    """transformers' streamer protocol: `put` gets the prompt once, then each new token."""

    def __init__(self, on_tokens: Callable[[list[int]], None]) -> None:
        self.on_tokens = on_tokens
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.on_tokens([int(t) for t in value.reshape(-1).tolist()])

    def end(self) -> None:
        pass


class _Halt:
    """A stopping criterion: the request was cancelled, or a stop text was reached."""

    def __init__(self, cancelled: threading.Event, text: TextStream) -> None:
        self.cancelled, self.text = cancelled, text

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: Any) -> torch.Tensor:
        done = self.cancelled.is_set() or self.text.stopped
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


# ---- one model answering ---------------------------------------------------------------------


def prompt_ids(trained: TrainedModel, spec: GenerateSpec) -> torch.Tensor:
    """The prompt's token ids (with the tokenizer's own special tokens, as training saw them),
    or the chat rendered by the tokenizer's template; InvalidInput when it does not fit."""
    tokenizer, name = trained.tokenizer, trained.source.model
    if spec.messages:
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidInput(
                f"Model {name!r} has no chat template in its tokenizer; send prompt (plain text "
                "to continue) instead of messages.",
                field="messages",
            )
        text = tokenizer.apply_chat_template(
            chat_turns(spec.messages), tokenize=False, add_generation_prompt=True
        )
        ids: torch.Tensor = tokenizer(text, add_special_tokens=False, return_tensors="pt")[
            "input_ids"
        ]
    else:
        ids = tokenizer(spec.prompt, return_tensors="pt")["input_ids"]
    field = "messages" if spec.messages else "prompt"
    if ids.shape[1] == 0:
        raise InvalidInput(f"The {field} has no tokens; give some text.", field=field)
    context = trained.context_length
    if context is not None:
        if ids.shape[1] >= context:
            raise InvalidInput(
                f"The {field} is {ids.shape[1]} tokens; {name!r} attends to at most {context} "
                "tokens, prompt and answer together. Shorten it.",
                field=field,
            )
        if ids.shape[1] + spec.max_new_tokens > context:
            room = context - ids.shape[1]
            raise InvalidInput(
                f"maxNewTokens {spec.max_new_tokens} does not fit: {name!r} attends to "
                f"{context} tokens and the {field} takes {ids.shape[1]}; ask for at most {room}.",
                field="maxNewTokens",
            )
    return ids


@dataclass
class Answer:
    """One model's answer, as `answer()` leaves it."""

    finish_reason: str
    completion_tokens: int
    first_piece_at: float | None
    generation_seconds: float
    text: str


def answer(
    trained: TrainedModel,
    ids: torch.Tensor,
    spec: GenerateSpec,
    on_piece: Callable[[str, int], None],
    cancelled: threading.Event | None = None,
) -> Answer:
    """Generates one answer with `model.generate`, calling `on_piece(text, tokens_so_far)` for
    each released piece (in this thread)."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    cancelled = cancelled or threading.Event()
    text = TextStream(trained.tokenizer, spec.stop)
    count = 0
    first: list[float] = []

    def on_tokens(new: list[int]) -> None:
        nonlocal count
        count += len(new)
        piece = text.push(new)
        if piece:
            if not first:
                first.append(time.perf_counter())
            on_piece(piece, count)

    options: dict[str, Any] = {
        "max_new_tokens": spec.max_new_tokens,
        "do_sample": False,
        "streamer": _Streamer(on_tokens),
        "stopping_criteria": StoppingCriteriaList([_Halt(cancelled, text)]),
    }
    if not spec.greedy:
        sampler = SeededSampler(spec.temperature, spec.top_p, spec.seed, trained.device)
        options["logits_processor"] = LogitsProcessorList([sampler])
    started = time.perf_counter()
    with torch.inference_mode():
        model: Any = trained.model
        output = model.generate(
            input_ids=ids.to(trained.device),
            attention_mask=torch.ones_like(ids, device=trained.device),
            **options,
        )
    tail = text.finish()
    if tail:
        if not first:
            first.append(time.perf_counter())
        on_piece(tail, count)
    seconds = time.perf_counter() - started
    return Answer(
        finish_reason=_finish_reason(trained, output[0, ids.shape[1] :], spec, text, cancelled),
        completion_tokens=count,
        first_piece_at=first[0] if first else None,
        generation_seconds=seconds,
        text=text.answer,
    )


def _finish_reason(
    trained: TrainedModel,
    generated: torch.Tensor,
    spec: GenerateSpec,
    text: TextStream,
    cancelled: threading.Event,
) -> str:
    if cancelled.is_set():
        return "cancelled"
    if text.stopped:
        return "stop"
    eos = trained.model.generation_config.eos_token_id
    ends = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if generated.numel() and int(generated[-1]) in ends:
        return "eos"
    return "length" if generated.numel() >= spec.max_new_tokens else "eos"


# ---- loaded models, within a bound -----------------------------------------------------------


def default_cache_bytes() -> int:
    """Half of this machine's memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError):
        return 8 * 1024**3


@dataclass
class _Entry:
    trained: TrainedModel
    nbytes: int
    users: int = 0


@dataclass
class ModelCache:
    """Loaded models by (run folder, model), least recently used first out, holding at most
    `limit` bytes of weights between requests. A model in use is never evicted; a model larger
    than the whole bound is refused."""

    limit: int
    loader: Callable[[TrainedSource], TrainedModel] = load_trained
    _entries: OrderedDict[tuple[str, str], _Entry] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loading: dict[tuple[str, str], threading.Lock] = field(default_factory=dict)

    @staticmethod
    def key(source: TrainedSource) -> tuple[str, str]:
        return (str(source.run_dir.resolve()), source.model)

    @contextlib.contextmanager
    def use(self, source: TrainedSource) -> Iterator[tuple[TrainedModel, bool]]:
        """The loaded model of `source` (loaded now unless cached) and whether it was cached."""
        entry, cached = self._acquire(source)
        try:
            yield entry.trained, cached
        finally:
            with self._lock:
                entry.users -= 1
                self._evict()

    def _acquire(self, source: TrainedSource) -> tuple[_Entry, bool]:
        key = self.key(source)
        with self._lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one load per model, however many requests ask for it at once
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.users += 1
                    self._entries.move_to_end(key)
                    return entry, True
            trained = self.loader(source)
            size = trained.nbytes
            if size > self.limit:
                del trained
                _free()
                raise Conflict(
                    f"Model {source.model!r} takes {size / 1024**3:.2f} GiB loaded, more than the "
                    f"generation cache's bound of {self.limit / 1024**3:.2f} GiB; start the "
                    "training service with a larger --generate-cache-gib.",
                    field="models",
                )
            with self._lock:
                entry = self._entries[key] = _Entry(trained, size, users=1)
                self._evict()
            return entry, False

    def _evict(self) -> None:
        """Least recently used idle models out until the rest fit (caller holds the lock)."""
        evicted = False
        while self.held > self.limit:
            idle = next((k for k, e in self._entries.items() if e.users == 0), None)
            if idle is None:
                break  # the rest are answering now; they go once they are idle
            entry = self._entries.pop(idle)
            log.info("generation cache: evicted %s of %s (%d bytes)", *reversed(idle), entry.nbytes)
            evicted = True
        if evicted:
            _free()

    @property
    def held(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def models(self) -> list[tuple[str, str]]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
        _free()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- the service's side: several models, one stream -------------------------------------------


class Generator:
    """Generations of the training service: bounded in number, each model in a thread of the
    pool, events handed to the event loop as they come."""

    def __init__(
        self,
        models_root: Path,
        *,
        cache_bytes: int | None = None,
        max_concurrent: int | None = None,
    ) -> None:
        self.models_root = Path(models_root)
        limit = cache_bytes or int(_LIMITS["cache_bytes"]) or default_cache_bytes()
        self.cache = ModelCache(limit)
        self.max_concurrent = max_concurrent or int(_LIMITS["max_concurrent"])
        most_models = int(TRAINING_CONFIG["limits"]["max_models"])
        self._pool = ThreadPoolExecutor(
            self.max_concurrent * most_models, thread_name_prefix="oneseek-generate"
        )
        self._active = 0
        self._cancels: set[threading.Event] = set()

    @property
    def active(self) -> int:
        """Generations answering now."""
        return self._active

    async def stream(
        self, run_dir: Path, models: Sequence[str], spec: GenerateSpec
    ) -> AsyncIterator[training_pb2.GenerateEvent]:
        """Each model's `started`, its text pieces, then its `done`, interleaved as produced.
        Every check (the folder verifies, the prompt fits each model) passes before the first
        event; a client that goes away cancels the generation at its next token."""
        arrived = time.perf_counter()
        if self._active >= self.max_concurrent:
            raise TooSlow(
                f"The service is generating {self._active} answers already (its limit); try "
                "again when one ends.",
                field="models",
            )
        self._active += 1
        cancelled = threading.Event()
        self._cancels.add(cancelled)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[training_pb2.GenerateEvent | BaseException | None] = asyncio.Queue()
        ready = [threading.Event() for _ in models]
        go = threading.Event()
        failures: list[BaseException] = []

        def put(item: training_pb2.GenerateEvent | BaseException | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def one(index: int, name: str) -> None:
            try:
                source = locate(run_dir, name, self.models_root)
                with self.cache.use(source) as (trained, cached):
                    try:
                        ids = prompt_ids(trained, spec)
                    finally:
                        ready[index].set()
                    go.wait()
                    if failures or cancelled.is_set():
                        return
                    self._answer(name, trained, cached, ids, spec, arrived, cancelled, put)
            except BaseException as error:  # handed to the stream, which raises it there
                failures.append(error)
                ready[index].set()
                put(error)
            finally:
                put(None)

        futures: list[Future[None]] = []
        try:
            futures = [self._pool.submit(one, i, name) for i, name in enumerate(models)]
            await asyncio.to_thread(lambda: [event.wait() for event in ready])
            go.set()
            if failures:
                raise failures[0]
            pending = len(models)
            while pending:
                item = await queue.get()
                batch = [item]
                while not queue.empty():  # a slow reader gets the pieces so far in one message
                    batch.append(queue.get_nowait())
                for event in _coalesce(batch):
                    if event is None:
                        pending -= 1
                    elif isinstance(event, BaseException):
                        raise _as_domain(event)
                    else:
                        yield event
        finally:
            cancelled.set()
            go.set()
            self._cancels.discard(cancelled)
            self._active -= 1
            for future in futures:  # each ends at its next token; never left running unowned
                await asyncio.wrap_future(future)

    def _answer(
        self,
        name: str,
        trained: TrainedModel,
        cached: bool,
        ids: torch.Tensor,
        spec: GenerateSpec,
        arrived: float,
        cancelled: threading.Event,
        put: Callable[[training_pb2.GenerateEvent], None],
    ) -> None:
        precision = training_pb2.Precision.Value(f"PRECISION_{trained.precision.upper()}")
        started = training_pb2.GenerationStarted(
            prompt_tokens=ids.shape[1],
            device=str(trained.device),
            precision=precision,
            load_seconds=0.0 if cached else trained.load_seconds,
            cached=cached,
        )
        put(training_pb2.GenerateEvent(model=name, started=started))

        # the first piece goes at once (time to first token); later ones at most every
        # PIECE_INTERVAL: each hand-over wakes the event loop, whose work would otherwise
        # compete with the generation for the CPU (and the GIL) at every token
        held: list[str] = []
        tokens_so_far, last_sent = 0, 0.0

        def send() -> None:
            nonlocal last_sent
            if held:
                piece = training_pb2.GeneratedText(
                    text="".join(held), completion_tokens=tokens_so_far
                )
                put(training_pb2.GenerateEvent(model=name, token=piece))
                held.clear()
                last_sent = time.perf_counter()

        def on_piece(text: str, tokens: int) -> None:
            nonlocal tokens_so_far
            held.append(text)
            tokens_so_far = tokens
            if time.perf_counter() - last_sent >= PIECE_INTERVAL:
                send()

        result = answer(trained, ids, spec, on_piece, cancelled)
        send()
        first = result.first_piece_at
        done = training_pb2.GenerationDone(
            finish_reason=result.finish_reason,
            prompt_tokens=ids.shape[1],
            completion_tokens=result.completion_tokens,
            time_to_first_token_seconds=(first - arrived) if first is not None else 0.0,
            tokens_per_second=result.completion_tokens / max(result.generation_seconds, 1e-9),
            generation_seconds=result.generation_seconds,
            text=result.text,
        )
        put(training_pb2.GenerateEvent(model=name, done=done))

    def shutdown(self) -> None:
        """Cancels every generation (each ends at its next token) and waits for the threads."""
        for cancelled in list(self._cancels):
            cancelled.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.cache.clear()


def _coalesce(
    batch: list[training_pb2.GenerateEvent | BaseException | None],
) -> Iterator[training_pb2.GenerateEvent | BaseException | None]:
    """Adjacent text pieces of one model as one piece (the latest token count)."""
    merged: training_pb2.GenerateEvent | None = None
    for item in batch:
        if (
            merged is not None
            and isinstance(item, training_pb2.GenerateEvent)
            and item.WhichOneof("payload") == "token"
            and item.model == merged.model
        ):
            merged.token.text += item.token.text
            merged.token.completion_tokens = item.token.completion_tokens
            continue
        if merged is not None:
            yield merged
            merged = None
        if isinstance(item, training_pb2.GenerateEvent) and item.WhichOneof("payload") == "token":
            merged = item
        else:
            yield item
    if merged is not None:
        yield merged


def _as_domain(error: BaseException) -> BaseException:
    """A failure of a model's thread as the stream raises it: the project's own errors as they
    are; running out of memory as an error a person can act on."""
    if isinstance(error, OneSeekError):
        return error
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return Conflict(
            "The GPU ran out of memory while generating; ask for fewer models or fewer "
            "maxNewTokens, or free the GPU (a run training on it).",
            field="models",
        )
    return error
