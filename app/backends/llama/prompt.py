"""An OpenAI completion request turned into what the engine runs: prompt tokens, sampling, stops, limits."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from app.backends.llama.sampling import Sampling
from app.backends.llama.structured import grammar_for
from app.backends.llama.tools import ToolPlan, plan_tools, render_messages
from app.errors import InvalidRequest
from app.schemas import SERVED_TIERS, CompletionRequest
from app.types import CompletionKind, Priority

MAX_STOPS = 16

# Used only when neither the GGUF nor CHAT_TEMPLATE provides a template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True, slots=True)
class LocalRequest:
    """A request as the local model runs it, and what its response needs to say."""

    kind: CompletionKind
    prompt: list[int]
    sampling: Sampling
    max_tokens: int
    stops: tuple[str, ...]
    include_usage: bool
    service_tier: str  # the tier it is served at, which the response reports as OpenAI's do
    urgent: bool = False  # served at high priority: its prompt goes through the model alone
    echo: str = ""  # text completions with `echo`: the prompt, sent ahead of the answer
    logprobs: int | None = None  # None: not asked; else the alternatives wanted per token (0: the token's own)
    tools: ToolPlan | None = None  # the functions offered (chat), and the grammar of a required call
    n: int = 1  # choices, each a sequence of its own from the one prompt evaluation

    def sampling_of(self, choice: int) -> Sampling:
        """Choice `choice`'s sampling: the request's, with `seed` + `choice` as its seed when one is set (so
        choice i answers as a request of n=1 with that seed would)."""
        seed = self.sampling.seed
        if not choice or seed is None:
            return self.sampling
        return dataclasses.replace(self.sampling, seed=seed + choice)


MAX_TOP_LOGPROBS = {"chat": 20, "completion": 5}  # OpenAI's limits
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on each bias, either way

# OpenAI parameters the local model does not provide, each with the values that ask nothing of it: any other
# value answers 400 naming it rather than being ignored. Hints that cannot change an answer pass unread:
# user, metadata, safety_identifier, prompt_cache_key (the prefix cache needs no key), prediction (a speed
# hint), parallel_tool_calls (an answer makes one call at most).
_NOT_PROVIDED: dict[str, tuple[object, ...]] = {
    "suffix": (None, ""),
    "functions": (None,),
    "function_call": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "store": (None, False),
    "web_search_options": (None,),
    "verbosity": (None,),
    "reasoning_effort": (None,),
}
_INSTEAD = {"functions": "; use tools", "function_call": "; use tool_choice"}


def _check_provided(payload: dict[str, Any], n: int) -> None:
    """400 naming the first parameter the request asks of the model that it does not provide."""
    for name, nothing in _NOT_PROVIDED.items():
        if name in payload and payload[name] not in nothing:
            raise InvalidRequest(f"{name} is not supported by the local model{_INSTEAD.get(name, '')}", param=name)
    best_of = payload.get("best_of")
    if best_of is not None and best_of != n:
        raise InvalidRequest(
            "best_of is not supported by the local model (it returns every choice it generates); ask for n",
            param="best_of",
        )


def _logprobs(payload: dict[str, Any], kind: str) -> int | None:
    """The alternatives per token a request asks logprobs for (chat: logprobs true and top_logprobs; text:
    logprobs N), or None."""
    most = MAX_TOP_LOGPROBS[kind]
    if kind == "chat":
        wanted, top = payload.get("logprobs"), payload.get("top_logprobs")
        if wanted is None or wanted is False:
            if top is not None:
                raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
            return None
        if wanted is not True:
            raise InvalidRequest("logprobs must be a boolean", param="logprobs")
        value, param = (0 if top is None else top), "top_logprobs"
    else:
        value, param = payload.get("logprobs"), "logprobs"
        if value is None:
            return None
        if payload.get("echo") is True:
            raise InvalidRequest("logprobs of an echoed prompt are not supported", param="echo")
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= most:
        raise InvalidRequest(f"{param} must be an integer from 0 to {most}", param=param)
    return value


class Prompter:
    """Prepares requests for one loaded model: its chat template, tokenizer, vocabulary and context size."""

    def __init__(
        self,
        formatter: Jinja2ChatFormatter,
        tokenize: Callable[[str, bool], list[int]],
        vocab_size: int,
        n_ctx: int,
        default_max_tokens: int,
        parses: Callable[[str], bool] = lambda _: True,
        detokenize: Callable[[list[int]], str] = lambda _: "",
        renders_tools: bool = False,
        n_seq: int = 1,
    ):
        self._n_seq = n_seq  # sequences decoded at once: the most choices a request may ask for
        self._renders_tools = renders_tools  # whether the chat template writes `tools` into the prompt itself
        self._formatter = formatter
        self._parses = parses  # whether llama.cpp accepts a grammar
        self._detokenize = detokenize
        self._tokenize = tokenize
        self._vocab_size = vocab_size
        self._n_ctx = n_ctx
        self._default_max_tokens = default_max_tokens

    def prepare(self, request: CompletionRequest) -> LocalRequest:
        """Check the request and tokenize its prompt; raises InvalidRequest (400) for what the model cannot do."""
        payload = request.payload
        _check_provided(payload, request.n)
        if request.n > self._n_seq:
            raise InvalidRequest(
                f"n is {request.n}; this model decodes at most {self._n_seq} sequences at once "
                "(MAX_CONCURRENT_REQUESTS), one per choice",
                param="n",
            )
        logprobs = _logprobs(payload, request.kind)
        tools = plan_tools(payload) if request.kind == "chat" else None  # checked before they are rendered
        if request.kind == "chat":
            prompt, param = self._chat_prompt(payload), "messages"
        else:
            prompt, param = self._text_prompt(payload), "prompt"
        if not prompt:
            raise InvalidRequest("the prompt is empty", param=param)
        if len(prompt) >= self._n_ctx:
            raise InvalidRequest(
                f"the prompt is {len(prompt)} tokens; this model's context is {self._n_ctx} tokens per request "
                "(N_CTX), which must also hold at least one generated token",
                param=param,
                code="context_length_exceeded",
            )
        room = self._n_ctx - len(prompt)
        # Past the context too: finish_reason "length".
        max_tokens = min(request.max_tokens or self._default_max_tokens, room)
        options = payload.get("stream_options")
        grammar = grammar_for(payload.get("response_format"))
        if tools is not None and tools.grammar is not None:
            if grammar is not None:
                raise InvalidRequest(
                    "a required tool call and response_format cannot both shape the answer", param="response_format"
                )
            grammar = tools.grammar
        if grammar is not None and not self._parses(grammar):
            param = "tools" if tools is not None and grammar is tools.grammar else "response_format"
            raise InvalidRequest("the schema gives a grammar llama.cpp cannot use", param=param)
        return LocalRequest(
            kind=request.kind,
            prompt=prompt,
            sampling=dataclasses.replace(_sampling(payload), grammar=grammar, logit_bias=self._logit_bias(payload)),
            max_tokens=max_tokens,
            stops=_stops(payload.get("stop")),
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
            service_tier=SERVED_TIERS[request.priority] if request.priority is not None else "default",
            urgent=request.priority is Priority.HIGH,
            echo=self._echo(payload, prompt) if request.kind == "completion" else "",
            logprobs=logprobs,
            tools=tools,
            n=request.n,
        )

    def _logit_bias(self, payload: dict[str, Any]) -> tuple[tuple[int, float], ...]:
        """OpenAI's logit_bias: token ids (as the JSON object's keys) to a bias from -100 to 100."""
        value = payload.get("logit_bias")
        if value is None:
            return ()
        if not isinstance(value, dict):
            raise InvalidRequest("logit_bias must be an object of token ids to numbers", param="logit_bias")
        biases = []
        for key, bias in value.items():
            token = int(key) if isinstance(key, str) and key.isdigit() else -1
            if not 0 <= token < self._vocab_size:
                raise InvalidRequest(
                    f"logit_bias keys must be token ids from 0 to {self._vocab_size - 1}, not {key!r}",
                    param="logit_bias",
                )
            if isinstance(bias, bool) or not isinstance(bias, int | float) or abs(bias) > MAX_LOGIT_BIAS:
                raise InvalidRequest(
                    f"logit_bias values must be numbers from -{MAX_LOGIT_BIAS:g} to {MAX_LOGIT_BIAS:g}",
                    param="logit_bias",
                )
            biases.append((token, float(bias)))
        return tuple(biases)

    def _echo(self, payload: dict[str, Any], tokens: list[int]) -> str:
        """The prompt as `echo` repeats it: the client's own string, or its token ids as text."""
        echo = payload.get("echo")
        if echo is None or echo is False:
            return ""
        if echo is not True:
            raise InvalidRequest("echo must be a boolean", param="echo")
        prompt = payload["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        return prompt if isinstance(prompt, str) else self._detokenize(tokens)

    def _chat_prompt(self, payload: dict[str, Any]) -> list[int]:
        try:
            formatted = self._formatter(
                messages=render_messages(payload, self._renders_tools),
                tools=payload.get("tools"),
                tool_choice=payload.get("tool_choice"),
            )
        except (TemplateError, ValueError, TypeError, KeyError) as exc:
            raise InvalidRequest(
                f"the messages do not fit the model's chat template: {exc}", param="messages"
            ) from None
        # Chat templates write their own BOS where the model wants one.
        return self._tokenize(formatted.prompt, False)

    def _text_prompt(self, payload: dict[str, Any]) -> list[int]:
        prompt = payload["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self._tokenize(prompt, True)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if any(not 0 <= t < self._vocab_size for t in prompt):
                raise InvalidRequest(f"token ids must be between 0 and {self._vocab_size - 1}", param="prompt")
            return list(prompt)
        raise InvalidRequest("the local backend takes one prompt per request", param="prompt")


def _number(payload: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = payload.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise InvalidRequest(f"{name} must be a number between {low} and {high}", param=name)
    return float(value)


def _sampling(payload: dict[str, Any]) -> Sampling:
    top_k = payload.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise InvalidRequest("top_k must be a whole number, 0 or more", param="top_k")
    seed = payload.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidRequest("seed must be an integer", param="seed")
    return Sampling(
        temperature=_number(payload, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(payload, "top_p", 1.0, 0.0, 1.0),
        top_k=top_k,
        min_p=_number(payload, "min_p", 0.0, 0.0, 1.0),
        seed=seed,
        presence_penalty=_number(payload, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(payload, "frequency_penalty", 0.0, -2.0, 2.0),
        repeat_penalty=_number(payload, "repeat_penalty", 1.0, 0.0, 10.0),
    )


def _stops(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(s, str) for s in value) and len(value) <= MAX_STOPS:
        return tuple(s for s in value if s)
    raise InvalidRequest(f"stop must be a string or a list of at most {MAX_STOPS} strings", param="stop")
