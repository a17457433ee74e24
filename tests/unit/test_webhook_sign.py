"""Webhook signatures: Standard Webhooks ``v1`` HMAC-SHA256, checked against the standard
library, and the key a secret stands for."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from standardwebhooks import Webhook

from pullwake.webhooks import sign

BODY = b'{"wake_id":"wk_1","entity":"/t/\xc3\xa9"}'  # UTF-8, not ASCII


def expected(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


KEY = bytes(range(32))
WHSEC = "whsec_" + base64.b64encode(KEY).decode()


@pytest.mark.parametrize(
    ("secret", "key"),
    [
        (WHSEC, KEY),  # the standard form: the base64 after the prefix is the key
        ("plain-shared-secret", b"plain-shared-secret"),  # anything else is used as is
        ("whsec_not base64!", b"whsec_not base64!"),
        ("whsec_", b"whsec_"),  # nothing after the prefix: not an empty key
    ],
)
def test_signature_is_hmac_sha256_of_id_timestamp_body(secret: str, key: bytes) -> None:
    assert sign(secret, "wk_1", 1_700_000_000, BODY) == expected(key, "wk_1", 1_700_000_000, BODY)


def test_a_receiver_verifies_it_with_the_reference_library() -> None:
    import time

    now = int(time.time())
    headers = {
        "webhook-id": "wk_2",
        "webhook-timestamp": str(now),
        "webhook-signature": sign(WHSEC, "wk_2", now, BODY),
    }
    assert Webhook(WHSEC).verify(BODY, headers) == {"wake_id": "wk_1", "entity": "/t/é"}
