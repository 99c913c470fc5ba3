"""The body of `GET /v1/providers/:id/attestation`: what anyone may check about a provider."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from cluster.registry import ProviderInfo
from kernel.labels import TrustTier


def attestation_document(provider: ProviderInfo) -> dict[str, Any]:
    """The body of `GET /v1/providers/:id/attestation`."""
    verified = provider.trust_tier == TrustTier.verified.value
    evidence = provider.cc_evidence if verified else None
    return {
        "object": "provider.attestation",
        "provider_id": provider.id,
        "trust_tier": provider.trust_tier,
        "basis": (
            "nvidia-confidential-computing" if verified else "software: facts the agent reported"
        ),
        "public_key": (
            None
            if provider.public_key is None
            else {"type": "x25519", "encoding": "base64", "value": provider.public_key}
        ),
        "gpu": {
            "name": provider.gpu_name,
            "vram_gb": provider.vram_gb,
            "count": provider.gpu_count,
            "driver_version": provider.driver_version,
            "cuda_version": provider.cuda_version,
        },
        "confidential_computing": {
            "state": provider.cc_state,
            "evidence": evidence,
            "note": (
                "The GPU's reports carry a nonce binding the public key above; this proves the "
                "GPU and the binding, not that the private key is held inside a TEE."
                if verified
                else None
            ),
        },
        "status": provider.status,
        "last_heartbeat_at": _iso(provider.last_heartbeat_at),
    }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()
