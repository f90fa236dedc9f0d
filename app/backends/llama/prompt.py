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
class Prompt:
    """One prompt of a request: its tokens, the tokens its answers may take, and what `echo` sends ahead."""

    tokens: list[int]
    max_tokens: int
    echo: str = ""  # text completions with `echo`: the prompt, sent ahead of each answer


@dataclass(frozen=True, slots=True)
class LocalRequest:
    """A request as the local model runs it, and what its response needs to say."""

    kind: CompletionKind
    prompts: tuple[Prompt, ...]  # a chat's one; a text completion's one or several (`prompt` as a list)
    sampling: Sampling
    stops: tuple[str, ...]
    include_usage: bool
    service_tier: str  # the tier it is served at, which the response reports as OpenAI's do
    urgent: bool = False  # served at high priority: its prompt goes through the model alone
    logprobs: int | None = None  # None: not asked; else the alternatives wanted per token (0: the token's own)
    tools: ToolPlan | None = None  # the functions offered (chat), and the grammar of a required call
    n: int = 1  # choices per prompt, each a sequence of its own from the one prompt evaluation

    @property
    def choices(self) -> int:
        """Every choice of every prompt: the answer's `choices`, indexed prompt by prompt as OpenAI does."""
        return self.n * len(self.prompts)

    def prompt_of(self, index: int) -> Prompt:
        """The prompt that choice `index` answers."""
        return self.prompts[index // self.n]

    def sampling_of(self, index: int) -> Sampling:
        """Choice `index`'s sampling: the request's, with `seed` + its place among its prompt's n choices as
        its seed when one is set (so it answers as a request of n=1 with that seed would)."""
        choice = index % self.n
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
        """Check the request and tokenize its prompts; raises InvalidRequest (400) for what the model cannot do."""
        payload = request.payload
        _check_provided(payload, request.n)
        logprobs = _logprobs(payload, request.kind)
        tools = plan_tools(payload) if request.kind == "chat" else None  # checked before they are rendered
        if request.kind == "chat":
            texts: list[tuple[list[int], str | None]] = [(self._chat_prompt(payload), None)]
            param = "messages"
        else:
            texts, param = self._text_prompts(payload), "prompt"
        sequences = request.n * len(texts)
        if sequences > self._n_seq:
            asked = f"n is {request.n}" if len(texts) == 1 else f"{len(texts)} prompts of n={request.n} choices"
            raise InvalidRequest(
                f"{asked}: {sequences} sequences, and this model decodes at most {self._n_seq} at once "
                "(MAX_CONCURRENT_REQUESTS), one per choice",
                param="n" if len(texts) == 1 else "prompt",
            )
        prompts = tuple(self._prompt(tokens, given, request, param) for tokens, given in texts)
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
            prompts=prompts,
            sampling=dataclasses.replace(_sampling(payload), grammar=grammar, logit_bias=self._logit_bias(payload)),
            stops=_stops(payload.get("stop")),
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
            service_tier=SERVED_TIERS[request.priority] if request.priority is not None else "default",
            urgent=request.priority is Priority.HIGH,
            logprobs=logprobs,
            tools=tools,
            n=request.n,
        )

    def _prompt(self, tokens: list[int], given: str | None, request: CompletionRequest, param: str) -> Prompt:
        """A prompt's tokens checked against the context, with its answers' limit and its echo (`given`: the
        client's own text of it, when it sent text)."""
        if not tokens:
            raise InvalidRequest("the prompt is empty", param=param)
        if len(tokens) >= self._n_ctx:
            raise InvalidRequest(
                f"the prompt is {len(tokens)} tokens; this model's context is {self._n_ctx} tokens per request "
                "(N_CTX), which must also hold at least one generated token",
                param=param,
                code="context_length_exceeded",
            )
        # Past the context too: finish_reason "length".
        max_tokens = min(request.max_tokens or self._default_max_tokens, self._n_ctx - len(tokens))
        echo = self._echo(request.payload, tokens, given) if request.kind == "completion" else ""
        return Prompt(tokens, max_tokens, echo)

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

    def _echo(self, payload: dict[str, Any], tokens: list[int], given: str | None) -> str:
        """The prompt as `echo` repeats it: the client's own string, or its token ids as text."""
        echo = payload.get("echo")
        if echo is None or echo is False:
            return ""
        if echo is not True:
            raise InvalidRequest("echo must be a boolean", param="echo")
        return given if given is not None else self._detokenize(tokens)

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

    def _text_prompts(self, payload: dict[str, Any]) -> list[tuple[list[int], str | None]]:
        """A text completion's prompts, as OpenAI takes them (a string, token ids, or a list of either): the
        tokens of each, with the client's text of it when it sent text."""
        prompt = payload["prompt"]
        if isinstance(prompt, str) or _is_ids(prompt):
            return [self._text_prompt(prompt)]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_ids(p) for p in prompt):
            return [self._text_prompt(p) for p in prompt]
        raise InvalidRequest("prompt must be a string, token ids, or a list of either", param="prompt")

    def _text_prompt(self, prompt: str | list[int]) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            return self._tokenize(prompt, True), prompt
        if any(not 0 <= t < self._vocab_size for t in prompt):
            raise InvalidRequest(f"token ids must be between 0 and {self._vocab_size - 1}", param="prompt")
        return list(prompt), None


def _is_ids(value: object) -> bool:
    """Whether a prompt is token ids (a non-empty list of integers)."""
    if not isinstance(value, list) or not value:
        return False
    return all(isinstance(t, int) and not isinstance(t, bool) for t in value)


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
