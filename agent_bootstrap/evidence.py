"""Confidential-computing evidence as the agent makes it and the platform receives it.

The platform hands out a challenge; the agent asks each GPU for an attestation report over
`nonce = SHA-256(DOMAIN ‖ x25519_pub ‖ challenge)` and sends the reports and certificate chains
(`CcEvidence`). The platform's checks are in `cluster.attestation`; this module is the wire
format both sides share, and the agent's half.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent_bootstrap.nvml import GpuReader

DOMAIN = b"darkgpu.io/attestation/v1"
EVIDENCE_FORMAT: Final = "darkgpu.nvidia-cc/v1"


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def bound_nonce(public_key: bytes, challenge: bytes) -> bytes:
    """The nonce a GPU report must carry: it names the provider's key and our challenge."""
    return hashlib.sha256(DOMAIN + public_key + challenge).digest()


class GpuEvidence(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int = Field(ge=0)
    uuid: str | None = Field(default=None, max_length=128)
    report: str = Field(description="base64 of NVML's attestation report (SPDM measurements)")
    certificate_chain: str = Field(description="base64 of the GPU's PEM certificate chain")


class CcEvidence(BaseModel):
    """What the agent sends with `register` when CC is on."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["darkgpu.nvidia-cc/v1"] = EVIDENCE_FORMAT
    challenge: str = Field(max_length=200, description="from POST /v1/providers/challenge")
    nonce: str = Field(description="hex of SHA-256(DOMAIN ‖ x25519_pub ‖ challenge)")
    gpus: list[GpuEvidence] = Field(min_length=1, max_length=16)


def make_evidence(
    reader: GpuReader, public_key: bytes, challenge: str, gpu_count: int
) -> CcEvidence:
    """The agent's side: every GPU's attestation report over the nonce bound to our key."""
    raw = base64.urlsafe_b64decode(challenge.encode("ascii"))
    nonce = bound_nonce(public_key, raw)
    gpus = []
    for index in range(gpu_count):
        report, chain = reader.attestation_report(index, nonce)
        gpus.append(
            GpuEvidence(index=index, report=b64encode(report), certificate_chain=b64encode(chain))
        )
    return CcEvidence(challenge=challenge, nonce=nonce.hex(), gpus=gpus)
