"""Trust tiers and the attestation document of `GET /v1/providers/:id/attestation`.

The rule: a provider is `verified` only when NVML reports confidential computing ON (not
off, not dev-tools) AND evidence was produced over a nonce that binds its X25519 public key
AND that evidence was checked here. Everything else is `basic` (software-attested: the agent
reported its facts, nothing proves them). A CC-capable GPU with CC off is `basic`.

The binding (marketplaces.md §3): the platform hands out a fresh challenge; the agent asks
each GPU for an attestation report over `nonce = SHA-256(DOMAIN ‖ x25519_pub ‖ challenge)`
(32 bytes, what `nvmlDeviceGetConfComputeGpuAttestationReport` takes) and sends the reports
and certificate chains (`CcEvidence`). The platform recomputes the nonce itself, checks the
challenge is its own and fresh (stateless: an HMAC under the platform's secret, with a
timestamp), then hands the evidence to a `CcVerifier`. This proves the GPU, and that the
report was made for this key; it does not prove that the private key lives inside a TEE
(that also needs a CPU TDX/SNP quote), which the document says.

No real confidential-computing machine is reachable from here, so two verifiers exist:
`NoVerifier` (the default: nothing becomes `verified`) and `SignedReportVerifier`, the local
minimum of what NVIDIA's verifier checks (the report carries our nonce and is signed with
ECDSA P-384 by the leaf of a certificate chain that ends at a trusted root). A production
verifier (NVIDIA NRAS, or nvtrust's local verifier with RIM measurements and OCSP) plugs in
through the same `CcVerifier` protocol.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from agent_bootstrap.evidence import DOMAIN, CcEvidence, GpuEvidence, bound_nonce
from kernel.errors import InvalidRequest
from kernel.gpu import CcState
from kernel.labels import TrustTier

CHALLENGE_MAX_AGE_S = 600
NONCE_BYTES = 32
_CHALLENGE_RANDOM = 16
_CHALLENGE_MAC = 16
P384_SIGNATURE_BYTES = 96  # r ‖ s, 48 bytes each (SPDM 1.1, TPM_ALG_ECDSA_ECC_NIST_P384)
SPDM_NONCE_OFFSET = 4  # GET_MEASUREMENTS request: 4 header bytes, then the 32-byte nonce


class AttestationError(InvalidRequest):
    """Evidence, a key or a challenge this platform cannot accept; the message says which."""


def b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise AttestationError("not base64") from exc


def decode_public_key(text: str) -> bytes:
    """An X25519 public key as the agent sends it: standard base64 of its 32 raw bytes."""
    try:
        raw = b64decode(text)
    except AttestationError:
        raise AttestationError("public_key is not base64") from None
    if len(raw) != 32:
        raise AttestationError("public_key must be 32 bytes (an X25519 public key)")
    return raw


# --- challenges ------------------------------------------------------------------------------


def _challenge_mac(secret: bytes, provider_id: str, body: bytes) -> bytes:
    message = provider_id.encode() + b"\0" + body
    return hmac.new(secret, message, hashlib.sha256).digest()[:_CHALLENGE_MAC]


def issue_challenge(secret: bytes, provider_id: str, now: float) -> str:
    """A fresh challenge for `provider_id`: timestamp ‖ random ‖ HMAC, base64url."""
    body = struct.pack(">Q", int(now)) + secrets.token_bytes(_CHALLENGE_RANDOM)
    raw = body + _challenge_mac(secret, provider_id, body)
    return base64.urlsafe_b64encode(raw).decode("ascii")


def check_challenge(
    secret: bytes,
    provider_id: str,
    challenge: str,
    now: float,
    max_age_s: int = CHALLENGE_MAX_AGE_S,
) -> bytes:
    """The challenge's bytes, if this platform issued it to `provider_id` within `max_age_s`."""
    try:
        raw = base64.urlsafe_b64decode(challenge.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise AttestationError("the challenge is not one of ours") from None
    if len(raw) != 8 + _CHALLENGE_RANDOM + _CHALLENGE_MAC:
        raise AttestationError("the challenge is not one of ours")
    body, mac = raw[:-_CHALLENGE_MAC], raw[-_CHALLENGE_MAC:]
    if not hmac.compare_digest(mac, _challenge_mac(secret, provider_id, body)):
        raise AttestationError("the challenge is not one of ours")
    (issued,) = struct.unpack(">Q", body[:8])
    if not 0 <= now - issued <= max_age_s:
        raise AttestationError("the challenge has expired; ask for a new one")
    return raw


@dataclass(frozen=True)
class Verification:
    ok: bool
    verifier: str
    reason: str | None = None
    claims: dict[str, Any] = field(default_factory=dict)


class CcVerifier(Protocol):
    name: str

    def verify(self, evidence: CcEvidence, nonce: bytes) -> Verification:
        """Whether every GPU's report is genuine and carries `nonce`."""
        ...


class NoVerifier:
    """No verifier configured: evidence is kept, nothing is `verified`."""

    name = "none"

    def verify(self, evidence: CcEvidence, nonce: bytes) -> Verification:
        return Verification(
            False, self.name, "no confidential-computing verifier is configured on this platform"
        )


def _load_chain(data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        return [x509.load_der_x509_certificate(data)]


class SignedReportVerifier:
    """The local minimum of NVIDIA's GPU verifier: each report holds our nonce in its SPDM
    request, ends in an ECDSA P-384 (SHA-384) signature over the rest by the leaf of its
    certificate chain, and the chain ends at one of `roots`. RIM golden measurements and
    OCSP (NRAS and nvtrust check those) are not checked here."""

    name = "signed-report"

    def __init__(self, roots: Sequence[x509.Certificate]) -> None:
        self._roots = list(roots)

    def verify(self, evidence: CcEvidence, nonce: bytes) -> Verification:
        claims: dict[str, Any] = {"gpus": []}
        for gpu in evidence.gpus:
            reason = self._check_gpu(gpu, nonce)
            if reason is not None:
                return Verification(False, self.name, f"GPU {gpu.index}: {reason}")
            claims["gpus"].append({"index": gpu.index, "uuid": gpu.uuid, "signature": "valid"})
        return Verification(True, self.name, None, claims)

    def _check_gpu(self, gpu: GpuEvidence, nonce: bytes) -> str | None:
        try:
            report = b64decode(gpu.report)
            chain = _load_chain(b64decode(gpu.certificate_chain))
        except (AttestationError, ValueError):
            return "the report or certificate chain is not readable"
        if len(report) <= SPDM_NONCE_OFFSET + NONCE_BYTES + P384_SIGNATURE_BYTES:
            return "the report is too short"
        carried = report[SPDM_NONCE_OFFSET : SPDM_NONCE_OFFSET + NONCE_BYTES]
        if not hmac.compare_digest(carried, nonce):
            return "the report does not carry the nonce bound to this provider's key"
        body, sig = report[:-P384_SIGNATURE_BYTES], report[-P384_SIGNATURE_BYTES:]
        leaf_key = chain[0].public_key()
        if not isinstance(leaf_key, ec.EllipticCurvePublicKey):
            return "the leaf certificate has no EC key"
        r, s = int.from_bytes(sig[:48], "big"), int.from_bytes(sig[48:], "big")
        try:
            leaf_key.verify(encode_dss_signature(r, s), body, ec.ECDSA(hashes.SHA384()))
        except InvalidSignature:
            return "the report's signature is not valid"
        if not self._chains_to_root(chain):
            return "the certificate chain does not end at a trusted root"
        return None

    def _chains_to_root(self, chain: list[x509.Certificate]) -> bool:
        try:
            for child, parent in zip(chain, chain[1:], strict=False):
                child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            return False
        last = chain[-1]
        for root in self._roots:
            if last == root:
                return True
            try:
                last.verify_directly_issued_by(root)
                return True
            except (ValueError, TypeError, InvalidSignature):
                continue
        return False


# --- the decision ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TierDecision:
    tier: TrustTier
    reason: str
    record: dict[str, Any] | None = None  # what `providers.cc_evidence` keeps


def decide_tier(
    *,
    cc_state: CcState,
    public_key: str | None,
    evidence: CcEvidence | None,
    provider_id: str,
    secret: bytes,
    verifier: CcVerifier,
    now: float,
) -> TierDecision:
    """The provider's trust tier, by the rule at the top of this module."""
    if cc_state is not CcState.on:
        return TierDecision(TrustTier.basic, f"confidential computing is {cc_state.value}")
    if public_key is None:
        return TierDecision(TrustTier.basic, "no X25519 public key registered")
    if evidence is None:
        return TierDecision(TrustTier.basic, "confidential computing is on but no evidence sent")
    try:
        challenge = check_challenge(secret, provider_id, evidence.challenge, now)
        expected = bound_nonce(decode_public_key(public_key), challenge)
        sent = bytes.fromhex(evidence.nonce)
    except (AttestationError, ValueError) as exc:
        return TierDecision(TrustTier.basic, f"evidence refused: {exc}")
    if not hmac.compare_digest(sent, expected):
        return TierDecision(TrustTier.basic, "evidence refused: the nonce does not bind this key")
    result = verifier.verify(evidence, expected)
    if not result.ok:
        return TierDecision(TrustTier.basic, f"evidence not verified: {result.reason}")
    record = {
        "format": evidence.format,
        "nonce_binding": "sha256(domain || x25519_public_key || challenge)",
        "domain": DOMAIN.decode(),
        "challenge": evidence.challenge,
        "nonce": evidence.nonce,
        "gpus": [g.model_dump() for g in evidence.gpus],
        "verifier": result.verifier,
        "claims": result.claims,
        "verified_at": datetime.fromtimestamp(now, UTC).isoformat(),
    }
    return TierDecision(TrustTier.verified, "confidential computing on; evidence verified", record)
