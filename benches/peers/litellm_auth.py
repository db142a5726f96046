"""The LiteLLM peer's keys (litellm.yaml's custom_auth): each key's rpm and
tpm limits, which LiteLLM's rate limiter enforces with its counters in Redis.
The bench key's limits are out of reach; the exact key's rpm limit is the
exactness run's limit of 100 (benches/harness.py)."""

from fastapi import Request
from litellm.proxy._types import UserAPIKeyAuth

LIMITS = {
    "sk-bench": {"rpm_limit": 1_000_000_000, "tpm_limit": 1_000_000_000_000},
    "sk-exact": {"rpm_limit": 100, "tpm_limit": 1_000_000_000_000},
}


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    limits = LIMITS.get(api_key.removeprefix("Bearer ").strip())
    if limits is None:
        raise Exception("unknown key")
    return UserAPIKeyAuth(api_key=api_key, **limits)
