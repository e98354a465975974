"""Which class a job is and which providers may take it, best first; or the client error why none."""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Mapping

from dispatcher.contract.chat import JsonObjectFormat, JsonSchemaFormat
from dispatcher.contract.config import ClassPolicy, Config
from dispatcher.contract.errors import ContextTooLong, LargerThanQuota, NoProvider, QuotaExhausted
from dispatcher.contract.protocol import ChatRequest
from dispatcher.core.provider_state import ProviderLimits

# Why a provider cannot take this job as it is (a field its API refuses), or None.
Refusal = Callable[[str], str | None]


def needed_capabilities(request: ChatRequest) -> frozenset[str]:
    """What a provider must accept beyond plain chat to take this job."""
    needs: set[str] = set()
    if request.tools or any(
        message.get("role") == "tool" or message.get("tool_calls") for message in request.messages
    ):
        needs.add("tools")  # a provider without function calling refuses tool turns too
    match request.response_format:
        case JsonObjectFormat():
            needs.add("json_object")
        case JsonSchemaFormat():
            needs.add("json_schema")
    return frozenset(needs)


def classify_chat(
    *,
    task: str | None,
    thinking: bool,
    pins: list[str] | None,
    prompt_tokens: int,
    max_tokens: int | None,
    config: Config,
    limits: Mapping[str, ProviderLimits],
    needs: Collection[str] = (),
    refusal: Refusal | None = None,
) -> tuple[str, tuple[str, ...]]:
    """The job's class and the providers it may use, best first; or the client error why none.

    ``needs`` are the capabilities the job requires; ``refusal`` says why a
    provider's API would refuse the job as it is (a per-adapter quirk).
    """
    klass = task or ("complex" if thinking else "default")
    policy: ClassPolicy | None = config.classes.get(klass)
    if pins:
        unknown = [p for p in pins if p not in config.providers]
        if unknown:
            raise NoProvider(
                f"unknown provider {', '.join(unknown)}; known providers: "
                f"{', '.join(sorted(config.providers))}"
            )
        names = list(dict.fromkeys(pins))
        wrong_kind = [p for p in names if config.providers[p].kind != "chat"]
        if wrong_kind:
            raise NoProvider(f"{', '.join(wrong_kind)} cannot take chat jobs (embeddings only)")
    elif policy is None:
        raise NoProvider(
            f"no class {klass!r} in the configuration; use one of {', '.join(config.classes)}"
        )
    else:
        names = list(policy.providers)

    enabled = [p for p in names if p in limits and limits[p].enabled]
    if not enabled:
        reasons = "; ".join(f"{p}: {_why_disabled(p, limits)}" for p in names)
        raise NoProvider(f"no enabled provider for class {klass!r} ({reasons})")
    if thinking:
        enabled = [p for p in enabled if config.providers[p].thinking]
        if not enabled:
            raise NoProvider(
                f"no enabled provider of class {klass!r} supports thinking; "
                "drop 'thinking' or pin a provider that has it"
            )
    if needs:
        enabled = _capable(enabled, needs, klass, pinned=bool(pins), config=config, limits=limits)
    if refusal is not None:
        accepted = [p for p in enabled if refusal(p) is None]
        if not accepted:
            reasons = "; ".join(f"{p}: {refusal(p)}" for p in enabled)
            raise NoProvider(f"no provider can take this request as it is ({reasons})")
        enabled = accepted
    needed = prompt_tokens + (max_tokens or 0)
    fitting = tuple(p for p in enabled if config.providers[p].context_window >= needed)
    if not fitting:
        largest = max(enabled, key=lambda p: config.providers[p].context_window)
        window = config.providers[largest].context_window
        raise ContextTooLong(
            f"the prompt needs about {needed:,} tokens but the largest window among "
            f"{', '.join(enabled)} is {window:,} ({largest}); shorten the prompt"
        )
    return klass, fitting


def _capable(
    enabled: list[str],
    needs: Collection[str],
    klass: str,
    *,
    pinned: bool,
    config: Config,
    limits: Mapping[str, ProviderLimits],
) -> list[str]:
    """The providers that accept every needed capability, or NoProvider naming what is missing."""
    capable = [p for p in enabled if set(needs) <= set(config.providers[p].capabilities)]
    if capable:
        return capable
    wanted = " and ".join(sorted(needs))
    having = [
        name
        for name, provider in config.providers.items()
        if set(needs) <= set(provider.capabilities) and name in limits and limits[name].enabled
    ]
    where = "the pinned providers" if pinned else f"the providers of class {klass!r}"
    if having:
        raise NoProvider(
            f"this job needs {wanted}, which none of {where} ({', '.join(enabled)}) "
            f"accepts; {', '.join(having)} would: pin one with 'providers'"
        )
    raise NoProvider(
        f"this job needs {wanted}, which no enabled provider declares; add it to the "
        "capabilities of a provider that supports it (or enable one that does)"
    )


def classify_embed(
    pins: list[str] | None, config: Config, limits: Mapping[str, ProviderLimits]
) -> tuple[str, ...]:
    names = pins or [n for n, p in config.providers.items() if p.kind == "embed"]
    wrong = [p for p in names if p not in config.providers or config.providers[p].kind != "embed"]
    if wrong:
        raise NoProvider(f"{', '.join(wrong)} is not an embeddings provider")
    enabled = tuple(p for p in names if limits[p].enabled)
    if not enabled:
        reasons = "; ".join(f"{p}: {_why_disabled(p, limits)}" for p in names) or "none configured"
        raise NoProvider(f"no enabled embeddings provider ({reasons})")
    return enabled


def check_quota(
    eligible: tuple[str, ...], limits: Mapping[str, ProviderLimits], tokens: int, now: float
) -> None:
    """QuotaExhausted when no eligible provider has ``tokens`` left of its daily quota."""
    if any(limits[name].fits_today(tokens, now) for name in eligible):
        return
    budgets = [limits[name].daily for name in eligible]
    if all(budget is not None and tokens > budget.limit for budget in budgets):
        largest = max(budget.limit for budget in budgets if budget is not None)
        raise LargerThanQuota(
            f"the job needs about {tokens:,} tokens, more than the whole daily quota of "
            f"{', '.join(eligible)} ({largest:,} tokens): it can never fit; split it into "
            "smaller jobs"
        )
    soonest = min(eligible, key=lambda n: _frees_at(limits[n], tokens, now))
    wait = _frees_at(limits[soonest], tokens, now) - now
    raise QuotaExhausted(
        f"the daily token quota of {', '.join(eligible)} is used up; {soonest} has room for "
        f"this job again in {wait / 3600:.1f} h",
        retry_after_s=round(wait, 1),
    )


def _frees_at(state: ProviderLimits, tokens: int, now: float) -> float:
    return state.daily.frees_at(now, tokens) if state.daily is not None else now


def _why_disabled(name: str, limits: Mapping[str, ProviderLimits]) -> str:
    state = limits.get(name)
    return (state.problem if state else None) or "disabled"


def weighted_pick(policy: ClassPolicy, eligible: tuple[str, ...], rng: random.Random) -> str:
    """The seed's static weights: draw a provider regardless of how busy it is."""
    names = [p for p in eligible if policy.weights.get(p, 0) > 0] or list(eligible)
    weights = [policy.weights.get(p, 1.0) for p in names]
    return rng.choices(names, weights=weights)[0]
