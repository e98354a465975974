"""Compatibility names for the decision core, which now lives in :mod:`dispatcher.core`."""

from dispatcher.core.classify import check_quota, classify_chat, classify_embed, weighted_pick
from dispatcher.core.outcomes import backoff_s, describe_attempts, judge_failure
from dispatcher.core.plan import EXPIRY_SCAN, Plan, plan
from dispatcher.core.provider_state import RPM_WINDOW_S, ProviderLimits

__all__ = [
    "EXPIRY_SCAN",
    "RPM_WINDOW_S",
    "Plan",
    "ProviderLimits",
    "backoff_s",
    "check_quota",
    "classify_chat",
    "classify_embed",
    "describe_attempts",
    "judge_failure",
    "plan",
    "weighted_pick",
]
