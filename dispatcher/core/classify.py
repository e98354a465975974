"""Which class a job is and which providers may take it, best first; or the client error why none."""

from __future__ import annotations

import random
from collections.abc import Mapping

from dispatcher.contract.config import ClassPolicy, Config
from dispatcher.contract.errors import ContextTooLong, NoProvider, QuotaExhausted
from dispatcher.core.provider_state import ProviderLimits


def classify_chat(
    *,
    task: str | None,
    thinking: bool,
    pins: list[str] | None,
    prompt_tokens: int,
    max_tokens: int | None,
    config: Config,
    limits: Mapping[str, ProviderLimits],
) -> tuple[str, tuple[str, ...]]:
    """The job's class and the providers it may use, best first; or the client error why none."""
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
