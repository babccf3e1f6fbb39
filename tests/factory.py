"""Small event factory for tests that need hand-made traffic (the simulator covers realistic traffic)."""

from __future__ import annotations

import itertools
from typing import Any

from detector.gateway import make_event

BASE_TS = 1_775_000_000_000  # 2026-03-31T23:33:20Z
KEY = b"test-key"
_ids = itertools.count()


def event(account_id: str = "acct_1", ts: int = BASE_TS, prompt_text: str = "What is the capital of France?",
          **overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = dict(
        account_id=account_id, ts=ts, org_id=None, api_key_id=f"key_{account_id}", model="frontier-4",
        endpoint="/v1/messages", status=200, input_tokens=50, output_tokens=300, latency_ms=1200,
        client={"ip": "198.51.100.7", "asn": 64500, "country": "US", "user_agent": "Mozilla/5.0",
                "tls_fp": "t13d1516h2_aaaa"},
        billing={"payment_fp": f"pm_{account_id}", "tier": "build", "account_created_ts": BASE_TS - 400 * 86_400_000},
        response={"stop_reason": "end_turn", "refused": False},
        event_id=f"evt_{next(_ids):08d}",
    )
    fields.update(overrides)
    return make_event(prompt_text=prompt_text, fingerprint_key=KEY, **fields)
