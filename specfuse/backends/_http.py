"""What every HTTP backend shares: replicas, retries, tokens, errors, token alignment.

Kept apart from the protocol modules so that TGI, vLLM and SGLang behave the
same way on the things users notice: which host gets a token, how long a
failing server is retried, and what an error message says.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
)

# The errors are defined in specfuse.errors; these names stay importable from here.
from specfuse.errors import (
    BackendError,
    CapabilityError,
    ContextWindowErrorRemote,
    RemoteError,
    RetryableError,
)

T = TypeVar("T")

#: Hosts where an HF_TOKEN from the environment may be sent (Hugging Face hosted endpoints).
HF_HOST_SUFFIXES = (".huggingface.co", ".hf.space", ".endpoints.huggingface.cloud")
HF_HOSTS = ("huggingface.co", "endpoints.huggingface.cloud")


def is_hf_hosted(url: str) -> bool:
    """True for Hugging Face hosted inference URLs, the only hosts an env HF_TOKEN may reach."""
    host = (urlsplit(url).hostname or "").lower()
    return host in HF_HOSTS or host.endswith(HF_HOST_SUFFIXES)


def token_for(url: str, api_key: str | None) -> str | None:
    """The bearer token for one URL: the member's own key, else HF_TOKEN for HF hosts only."""
    if api_key:
        return api_key
    if is_hf_hosted(url):
        return os.environ.get("HF_TOKEN") or None
    return None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_from_status(status: int, body: str, headers: httpx.Headers | dict[str, str]) -> RemoteError:
    """Map an HTTP error to a specfuse error; the server's own message is kept, headers never are.

    With error_from_transport, the one table from what a server did to specfuse's
    errors, for every protocol (all of them post through post_json).
    """
    detail = _error_detail(body)[:500]
    retry_after = parse_retry_after(headers.get("retry-after"))
    if status in (429, 503):
        what = "overloaded" if status == 429 else "unavailable (an Inference Endpoint may be waking up)"
        return RetryableError(
            f"server {what}: HTTP {status}: {detail}", status=status, retry_after=retry_after
        )
    if status in (502, 504):
        return RetryableError(f"gateway error HTTP {status}: {detail}", status=status)
    if status == 401 or status == 403:
        return RemoteError(
            f"HTTP {status}: not authorised; check the member's api_key: {detail}", status=status
        )
    if status in (400, 413, 422) and CONTEXT_OVERFLOW.search(detail):
        return ContextWindowErrorRemote(f"HTTP {status}: {detail}", status=status)
    return RemoteError(f"HTTP {status}: {detail}", status=status)


def error_from_transport(exc: BaseException, what: str, limit: float | None = None) -> RetryableError:
    """Map a request that got no HTTP answer (timeout, refused, reset) to a specfuse error.

    `limit` is the attempt's own time limit, named when it is what ran out.
    """
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        after = f" after {limit:.3g} s" if isinstance(exc, TimeoutError) and limit is not None else ""
        return RetryableError(f"{what} timed out{after}: {type(exc).__name__}")
    return RetryableError(f"{what} could not reach the server: {type(exc).__name__}")


#: How each server words "the prompt does not fit the context window". A 422 about
#: `max_new_tokens` alone (TGI's "`max_new_tokens` must be <= N") is not one of them.
CONTEXT_OVERFLOW = re.compile(
    "|".join(
        [
            # TGI router/src/validation.rs, ValidationError::MaxTotalTokens and ::InputLength
            r"`inputs` tokens \+ `max_new_tokens` must be <=",
            r"`inputs` must have less than \d+ tokens",
            # vLLM: "This model's maximum context length is N tokens. However, ..."
            # (vllm/renderers/params.py, TokenizeParams._token_len_check and _text_len_check;
            # older releases: serving_engine._validate_input); "Input length (N) exceeds model's
            # maximum context length (M)." (vllm/entrypoints/serve/utils/api_utils.py); its
            # input processor: "The decoder prompt (length N) is longer than the maximum model
            # length of M"
            r"maximum context length is \d+",
            r"exceeds model's maximum",
            r"longer than the maximum model length",
            # SGLang managers/tokenizer_manager.py (_validate_one_request): "The input (N tokens)
            # is longer than the model's context length (M tokens)." and "Requested token count
            # exceeds the model's maximum context length of M tokens."
            r"longer than the model's context length",
            r"exceeds the model's maximum context length",
        ]
    ),
    re.IGNORECASE,
)


def _error_detail(body: str) -> str:
    """The human part of an error body: TGI's {"error": str}, vLLM's and SGLang's
    {"error": {"message": str}} (older vLLM: {"object": "error", "message": str}),
    FastAPI's {"detail": ...}; anything else as sent."""
    import json

    text = body.strip()
    try:
        data = json.loads(body)
    except ValueError:
        return text
    if not isinstance(data, dict):
        return text
    error = data.get("error")
    if isinstance(error, dict):
        error = error.get("message") or error.get("msg") or json.dumps(error, ensure_ascii=False)
    found = error or data.get("message") or data.get("detail")
    if found is None or found == "":
        return text
    return found if isinstance(found, str) else json.dumps(found, ensure_ascii=False)


# -- replicas -----------------------------------------------------------------


@dataclass
class ReplicaPool:
    """Round-robin over a member's replica URLs; a failing replica sits out a cool-down."""

    urls: Sequence[str]
    cooldown: float = 10.0
    _next: int = 0
    _down_until: dict[str, float] = field(default_factory=dict)

    def pick(self) -> str:
        """The next healthy replica; if all are cooling down, the one that recovers first."""
        now = time.monotonic()
        n = len(self.urls)
        for i in range(n):
            url = self.urls[(self._next + i) % n]
            if self._down_until.get(url, 0.0) <= now:
                self._next = (self._next + i + 1) % n
                return url
        return min(self.urls, key=lambda u: self._down_until.get(u, 0.0))

    def mark_down(self, url: str) -> None:
        if len(self.urls) > 1:
            self._down_until[url] = time.monotonic() + self.cooldown

    def mark_up(self, url: str) -> None:
        self._down_until.pop(url, None)


# -- retries ------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded by attempts and an overall deadline."""

    max_attempts: int = 6
    initial: float = 0.25
    maximum: float = 8.0
    #: Overall seconds for one logical call, retries included (None: attempts only).
    deadline: float | None = 120.0
    #: Seconds one attempt may take, whatever it does inside (None: the client's own timeouts).
    #: An attempt never runs past `deadline` either.
    attempt_timeout: float | None = None


#: Seconds an attempt needs at least; with less of the budget left, no retry is started.
_SHORTEST_ATTEMPT = 0.05


def _wait(policy: RetryPolicy) -> Callable[[RetryCallState], float]:
    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        backoff = min(policy.maximum, policy.initial * 2 ** (state.attempt_number - 1))
        delay = random.uniform(backoff / 2, backoff)  # jitter: replicas are not hit in lock-step
        if isinstance(exc, RetryableError) and exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, policy.maximum * 4))
        if policy.deadline is not None and state.start_time is not None:
            left = policy.deadline - (time.monotonic() - state.start_time)
            delay = max(0.0, min(delay, left))
        return delay

    return wait


async def with_retries(
    call: Callable[[str], Awaitable[T]],
    *,
    pool: ReplicaPool,
    policy: RetryPolicy,
    member: str | None,
    what: str,
) -> tuple[T, int]:
    """Run call(url) on a replica, retrying retryable failures on the next replica.

    Returns the result and the attempts it took. Failures become BackendError
    subclasses naming the member and the endpoint (URL without query or
    credentials) and carrying the attempts made, in `attempts`.
    """
    started = time.monotonic()
    stop = stop_after_attempt(policy.max_attempts)
    if policy.deadline is not None:
        budget = policy.deadline

        def out_of_budget(state: RetryCallState) -> bool:
            # No attempt starts with less than _SHORTEST_ATTEMPT left: it would time out at once.
            return time.monotonic() - started + state.upcoming_sleep >= budget - _SHORTEST_ATTEMPT

        stop = stop | out_of_budget
    attempts = 0
    url = ""

    def attempt_limit() -> float | None:
        """Seconds this attempt may take: its own timeout, cut to what the budget has left."""
        limits = [policy.attempt_timeout] if policy.attempt_timeout is not None else []
        if policy.deadline is not None:
            limits.append(max(0.0, policy.deadline - (time.monotonic() - started)))
        return min(limits) if limits else None

    retrying = AsyncRetrying(
        stop=stop,
        wait=_wait(policy),
        retry=retry_if_exception(lambda e: isinstance(e, RetryableError)),
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                attempts += 1
                url = pool.pick()
                limit = attempt_limit()
                try:
                    # The limit covers the whole attempt (connect, send, every byte of the
                    # answer): httpx's read timeout alone restarts with each byte received.
                    async with asyncio.timeout(limit):
                        result = await call(url)
                except RetryableError:
                    pool.mark_down(url)
                    raise
                except (httpx.TimeoutException, TimeoutError, httpx.TransportError, OSError) as exc:
                    pool.mark_down(url)
                    raise error_from_transport(exc, what, limit) from None
                pool.mark_up(url)
                return result, attempts
    except CapabilityError as exc:
        if exc.endpoint is None:
            raise CapabilityError(
                str(exc), member=member, endpoint=public_url(url), attempts=attempts
            ) from None
        exc.attempts = attempts
        raise
    except RemoteError as exc:
        suffix = f" after {attempts} attempts" if attempts > 1 else ""
        cls = type(exc)
        raise cls(
            f"{what} failed{suffix}: {exc.args[0] if exc.args else exc}",
            status=exc.status,
            member=member,
            endpoint=public_url(url),
            attempts=attempts,
        ) from None
    except BackendError as exc:  # raised by call itself, e.g. an answer of the wrong shape
        exc.attempts = attempts
        raise
    raise AssertionError("unreachable: tenacity either returns or raises")


def public_url(url: str) -> str:
    """A URL safe to print: no userinfo, no query string (which may hold a key)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}".rstrip("/")


def env_client_options() -> dict[str, Any]:
    """Client settings that honour the environment's proxies and CAs, never its credentials.

    `trust_env=True` reads HTTP(S)_PROXY, ALL_PROXY, NO_PROXY, SSL_CERT_FILE and
    SSL_CERT_DIR, which users behind a company proxy need. httpx before 0.28 also
    read `.netrc` credentials under trust_env (and every release turns a URL's
    user:password into Basic auth) when a client has no `auth`; an explicit
    no-op `Auth()` is returned by `_build_request_auth` before either is looked
    at, so the only credential that leaves is the member's own bearer token.
    """
    return {"trust_env": True, "auth": httpx.Auth()}


class LoopClients:
    """One httpx.AsyncClient per running event loop (backends are used from several loops)."""

    def __init__(self, factory: Callable[[], httpx.AsyncClient]) -> None:
        self._factory = factory
        self._clients: dict[int, tuple[asyncio.AbstractEventLoop, httpx.AsyncClient]] = {}

    def get(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        # Drop clients of loops that are gone so a closed loop's sockets are not reused.
        for key, (old, _) in list(self._clients.items()):
            if old.is_closed():
                del self._clients[key]
        entry = self._clients.get(id(loop))
        if entry is None or entry[0] is not loop:
            entry = (loop, self._factory())
            self._clients[id(loop)] = entry
        return entry[1]

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        entry = self._clients.pop(id(loop), None)
        if entry is not None:
            await entry[1].aclose()


async def post_json(
    client: httpx.AsyncClient,
    url: str,
    payload: dict[str, Any] | None,
    *,
    token: str | None,
    timeout: float,
    method: str = "POST",
) -> Any:
    """One JSON request; error statuses become RemoteError / RetryableError."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    # The request runs in a task of its own, cancelled once when the caller is. A
    # caller inside an anyio scope that was cancelled (Starlette's, when a gateway
    # client goes away) is cancelled again at every await, and httpcore's clean-up
    # then left the pooled connection open, so the server kept working for nobody
    # (tests/test_gateway.py, test_disconnect_mid_stream_cancels_member_calls).
    sent = asyncio.ensure_future(client.request(method, url, json=payload, headers=headers, timeout=timeout))
    # Retrieved here whatever happens, so a failure after the caller left is not logged as lost.
    sent.add_done_callback(lambda task: task.cancelled() or task.exception())
    try:
        response = await asyncio.shield(sent)
    except BaseException:
        sent.cancel()
        raise
    if response.status_code >= 400:
        raise error_from_status(response.status_code, response.text, response.headers)
    try:
        return response.json()
    except ValueError:
        raise RemoteError(
            f"HTTP {response.status_code}: the answer is not JSON: {response.text[:200]!r}",
            status=response.status_code,
        ) from None


# -- token alignment ----------------------------------------------------------


def covering_count(full_text: str, context_length: int, token_texts: Sequence[str | None]) -> int:
    """How many of the trailing tokens cover the text after context_length.

    `token_texts` are the server's per-token texts of a suffix (or all) of the
    tokenization of `full_text`. Servers decode each token on its own, so a
    token holding part of a multi-byte character comes back as U+FFFD; and a
    BOS the server added has text that is not in the input. We therefore walk
    back from the end in UTF-8 bytes: a clean token must match the bytes
    before it; a run of U+FFFD tokens spans up to the next clean token. A
    token covers the candidate when its span ends after the context (the
    straddling token belongs to the candidate). Inside a run of partial-byte
    tokens the boundary is apportioned by bytes, which is exact whenever the
    context ends on a clean token and at worst off by one token otherwise.
    """
    data = full_text.encode("utf-8")
    boundary = len(full_text[:context_length].encode("utf-8"))
    pos = len(data)
    count = 0
    i = len(token_texts) - 1
    while i >= 0 and pos > boundary:
        text = token_texts[i] or ""
        if "\ufffd" not in text:
            raw = text.encode("utf-8")
            if raw and data[:pos].endswith(raw):
                pos -= len(raw)
                count += 1
                i -= 1
                continue
            if not raw:  # an empty token text (some special tokens): zero width
                count += 1
                i -= 1
                continue
            # Decoders may drop or add a leading space on a lone token: tolerate it.
            stripped = raw.lstrip(b" ")
            if stripped and data[:pos].endswith(stripped):
                pos -= len(stripped)
                count += 1
                i -= 1
                continue
            raise ValueError(f"token text {text!r} does not match the input before byte {pos}")
        # A run of tokens with partial characters: find the clean token before it.
        j = i
        while j >= 0 and "\ufffd" in (token_texts[j] or ""):
            j -= 1
        run = i - j
        anchor = (token_texts[j] or "").encode("utf-8") if j >= 0 else b""
        # A partial token may also hold whole characters (" \ufffd" is a space and a
        # lead byte): the run is at least those bytes plus one per U+FFFD
        # (docs/design.md, "Reliability", token alignment).
        least = sum(
            len(t.replace("\ufffd", "").encode("utf-8")) + t.count("\ufffd")
            for t in (token_texts[k] or "" for k in range(j + 1, i + 1))
        )
        head = (token_texts[j + 1] or "").split("\ufffd", 1)[0].encode("utf-8")
        start = _run_start(data, pos, max(run, least), anchor, head)
        if boundary <= start:
            count += run
        else:
            share = (pos - boundary) / max(1, pos - start)
            count += max(1, min(run, round(run * share + 0.4999)))
        pos = start
        i = j
    return count


def _run_start(data: bytes, end: int, least: int, anchor: bytes, head: bytes = b"") -> int:
    """Where a run of partial tokens (at least `least` bytes) ending at `end` starts, after `anchor`.

    `head` is the whole-character text the run's first token starts with, if any.
    """
    lowest = max(0, end - 8 * least - 8)
    for start in range(end - least, lowest - 1, -1):
        if start < 0:
            break
        if (
            (start == len(data) or (data[start] & 0xC0) != 0x80)
            and data.startswith(head, start)
            and _ends_with_anchor(data[:start], anchor)
        ):
            return start
    return max(0, end - least * 4)


def _ends_with_anchor(prefix: bytes, anchor: bytes) -> bool:
    """prefix ends with the clean token before a partial run (or with it minus a decoder's leading space).

    A whitespace-only anchor (" ") stripped of its space is empty, and every
    prefix ends with b"": that once let a run start in the wrong place.
    """
    if not anchor or prefix.endswith(anchor):
        return True
    stripped = anchor.lstrip(b" ")
    return bool(stripped) and prefix.endswith(stripped)
