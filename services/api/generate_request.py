"""What a generation request asks for, checked once for every door: the gateway's JSON body
(camelCase), the GenerateRequest a gRPC client sends, and the CLI's flags all become one
`GenerateSpec` by these rules, each refusal naming its field and what is allowed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.api import training_pb2
from services.core.errors import InvalidInput
from services.core.training_config import (
    GENERATE_OPTIONS,
    TRAINING_CONFIG,
    validate_model_name,
)

ROLES = ("system", "user", "assistant")
_LIMITS = TRAINING_CONFIG["generation"]
_OPTIONS = {option.name: option for option in GENERATE_OPTIONS}
_REQUEST = training_pb2.GenerateRequest.DESCRIPTOR
_BODY_FIELDS = {f.json_name: f.name for f in _REQUEST.fields if f.name != "run_id"}


@dataclass(frozen=True)
class GenerateSpec:
    """One checked generation request (the run id is checked where it arrives)."""

    models: tuple[str, ...] = ()
    """Empty: the run's best model."""
    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()
    """(role, content) turns, for a tokenizer with a chat template; or `prompt`, never both."""
    max_new_tokens: int = int(_LIMITS["max_new_tokens"])
    temperature: float = float(_LIMITS["temperature"])
    top_p: float = float(_LIMITS["top_p"])
    seed: int = int(_LIMITS["seed"])
    stop: tuple[str, ...] = field(default=())

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def check_generate(values: Mapping[str, Any]) -> GenerateSpec:
    """A GenerateSpec from snake_case `values` (absent or None: the default); InvalidInput
    naming the camelCase field otherwise."""
    unknown = sorted(set(values) - set(_BODY_FIELDS.values()))
    if unknown:
        allowed = ", ".join(_BODY_FIELDS)
        raise InvalidInput(
            f"Unknown field {unknown[0]!r}; allowed fields: {allowed}.", field=unknown[0]
        )
    given = {key: value for key, value in values.items() if value is not None}
    prompt = _prompt(given.get("prompt", ""))
    messages = _messages(given.get("messages", ()))
    if prompt and messages:
        raise InvalidInput(
            "Give either prompt (text to continue) or messages (a chat), not both.",
            field="messages",
        )
    if not prompt and not messages:
        raise InvalidInput(
            "prompt is required: the text the models continue (or give messages for a chat).",
            field="prompt",
        )
    options = {name: opt.parse(given[name]) for name, opt in _OPTIONS.items() if name in given}
    return GenerateSpec(
        models=_models(given.get("models", ())),
        prompt=prompt,
        messages=messages,
        stop=_stop(given.get("stop", ())),
        **options,
    )


def _prompt(value: object) -> str:
    most = int(_LIMITS["max_prompt_chars"])
    if not isinstance(value, str):
        raise InvalidInput(f"prompt must be text, got {value!r}.", field="prompt")
    if len(value) > most:
        raise InvalidInput(
            f"prompt holds {len(value)} characters; at most {most} are allowed.", field="prompt"
        )
    return value


def _models(value: object) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise InvalidInput(f"models must be a list of model names, got {value!r}.", field="models")
    most = int(TRAINING_CONFIG["limits"]["max_models"])
    if len(value) > most:
        raise InvalidInput(
            f"models names {len(value)} models; a run holds at most {most}.", field="models"
        )
    names = [validate_model_name(name, "models") for name in value]
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice is not None:
        raise InvalidInput(f"Model {twice!r} is named twice; name each once.", field="models")
    return tuple(names)


def _messages(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, (list, tuple)):
        raise InvalidInput(
            f'messages must be a list of {{"role", "content"}} objects, got {value!r}.',
            field="messages",
        )
    most, chars = int(_LIMITS["max_messages"]), int(_LIMITS["max_prompt_chars"])
    if len(value) > most:
        raise InvalidInput(
            f"messages holds {len(value)} turns; at most {most} are allowed.", field="messages"
        )
    turns: list[tuple[str, str]] = []
    for index, item in enumerate(value):
        where = f"messages[{index}]"
        if isinstance(item, training_pb2.ChatMessage):
            item = {"role": item.role, "content": item.content}
        if not isinstance(item, Mapping) or set(item) - {"role", "content"}:
            raise InvalidInput(
                f"{where} must be an object with role and content only, got {item!r}.",
                field="messages",
            )
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise InvalidInput(
                f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}.", field="messages"
            )
        if not isinstance(content, str):
            raise InvalidInput(f"{where}.content must be text, got {content!r}.", field="messages")
        turns.append((str(role), content))
    if sum(len(content) for _, content in turns) > chars:
        raise InvalidInput(
            f"messages hold more than {chars} characters together; shorten the conversation.",
            field="messages",
        )
    if turns and turns[-1][0] == "assistant":
        raise InvalidInput(
            "messages must end with a user (or system) turn for the models to answer.",
            field="messages",
        )
    return tuple(turns)


def _stop(value: object) -> tuple[str, ...]:
    most, chars = int(_LIMITS["max_stop"]), int(_LIMITS["max_stop_chars"])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or len(value) > most:
        raise InvalidInput(
            f"stop must be a list of at most {most} texts, got {value!r}.", field="stop"
        )
    for text in value:
        if not isinstance(text, str) or not 1 <= len(text) <= chars:
            raise InvalidInput(
                f"Each stop text must be 1 to {chars} characters, got {text!r}.", field="stop"
            )
    return tuple(dict.fromkeys(value))


def read_generate_request(request: training_pb2.GenerateRequest) -> GenerateSpec:
    """The spec of a GenerateRequest as a gRPC client sent it: an unset optional takes its
    default."""
    values: dict[str, Any] = {
        "models": list(request.models),
        "prompt": request.prompt,
        "messages": list(request.messages),
        "stop": list(request.stop),
    }
    for name in _OPTIONS:
        if request.HasField(name):  # type: ignore[arg-type]
            values[name] = getattr(request, name)
    return check_generate(values)


def generate_body(body: object) -> dict[str, Any]:
    """A JSON request body (camelCase, as the page sends it) as snake_case values, refusing an
    unknown field."""
    if not isinstance(body, Mapping):
        raise InvalidInput(
            f"The body must be a JSON object with {', '.join(_BODY_FIELDS)}.", field="body"
        )
    values: dict[str, Any] = {}
    for key, value in body.items():
        name = _BODY_FIELDS.get(key)
        if name is None:
            raise InvalidInput(
                f"Unknown field {key!r}; allowed fields: {', '.join(_BODY_FIELDS)}.", field=key
            )
        values[name] = value
    return values


def to_generate_request(run_id: str, spec: GenerateSpec) -> training_pb2.GenerateRequest:
    """The GenerateRequest that asks for exactly `spec`."""
    return training_pb2.GenerateRequest(
        run_id=run_id,
        models=list(spec.models),
        prompt=spec.prompt,
        messages=[training_pb2.ChatMessage(role=r, content=c) for r, c in spec.messages],
        max_new_tokens=spec.max_new_tokens,
        temperature=spec.temperature,
        top_p=spec.top_p,
        seed=spec.seed,
        stop=list(spec.stop),
    )


def chat_turns(messages: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """The turns as a tokenizer's chat template takes them."""
    return [{"role": role, "content": content} for role, content in messages]
