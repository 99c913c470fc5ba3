from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent_bootstrap.evidence import CcEvidence, bound_nonce, make_evidence
from agent_bootstrap.nvml import RecordedReader
from cluster.attestation import (
    AttestationError,
    NoVerifier,
    SignedReportVerifier,
    check_challenge,
    decide_tier,
    issue_challenge,
)
from kernel.gpu import CcState
from kernel.labels import TrustTier
from tests.cluster.cc_pki import DevicePki
from tests.cluster.nvml_readings import H100, H100_CC_DEVTOOLS, H100_CC_ON

SECRET = b"s" * 32
NOW = 1_800_000_000.0


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


@pytest.fixture
def pki() -> DevicePki:
    return DevicePki.make()


@pytest.fixture
def key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def _evidence(pki: DevicePki, public: bytes, provider: str = "prv_1") -> CcEvidence:
    reader = RecordedReader(H100_CC_ON, report_signer=pki.sign_report)
    reader.read()
    return make_evidence(reader, public, issue_challenge(SECRET, provider, NOW), 1)


def _decide(evidence: CcEvidence | None, public: bytes, verifier, state=CcState.on, **kw):
    return decide_tier(
        cc_state=state,
        public_key=base64.b64encode(public).decode(),
        evidence=evidence,
        provider_id=kw.get("provider_id", "prv_1"),
        secret=SECRET,
        verifier=verifier,
        now=kw.get("now", NOW + 5),
    )


def test_challenges_are_bound_to_the_provider_and_expire() -> None:
    challenge = issue_challenge(SECRET, "prv_1", NOW)
    assert len(check_challenge(SECRET, "prv_1", challenge, NOW + 10)) == 40
    with pytest.raises(AttestationError, match="not one of ours"):
        check_challenge(SECRET, "prv_2", challenge, NOW + 10)
    with pytest.raises(AttestationError, match="not one of ours"):
        check_challenge(b"other" * 8, "prv_1", challenge, NOW + 10)
    with pytest.raises(AttestationError, match="expired"):
        check_challenge(SECRET, "prv_1", challenge, NOW + 601)
    tampered = challenge[:-4] + ("AAAA" if not challenge.endswith("AAAA") else "BBBB")
    with pytest.raises(AttestationError):
        check_challenge(SECRET, "prv_1", tampered, NOW + 10)


def test_the_nonce_binds_the_public_key(key: X25519PrivateKey) -> None:
    other = X25519PrivateKey.generate()
    assert bound_nonce(_public(key), b"c") != bound_nonce(_public(other), b"c")
    assert bound_nonce(_public(key), b"c") != bound_nonce(_public(key), b"d")
    assert len(bound_nonce(_public(key), b"c")) == 32


def test_cc_on_with_evidence_binding_the_key_is_verified(
    pki: DevicePki, key: X25519PrivateKey
) -> None:
    evidence = _evidence(pki, _public(key))
    decision = _decide(evidence, _public(key), SignedReportVerifier([pki.root]))
    assert decision.tier is TrustTier.verified, decision.reason
    assert decision.record is not None
    assert decision.record["verifier"] == "signed-report"
    assert decision.record["nonce"] == evidence.nonce
    json.dumps(decision.record)  # stored as JSON


def test_a_cc_capable_h100_with_cc_off_is_basic_even_with_evidence(
    pki: DevicePki, key: X25519PrivateKey
) -> None:
    assert H100.cc.capable
    evidence = _evidence(pki, _public(key))
    decision = _decide(evidence, _public(key), SignedReportVerifier([pki.root]), H100.cc.state)
    assert decision.tier is TrustTier.basic
    assert decision.reason == "confidential computing is off"


@pytest.mark.parametrize("state", [CcState.devtools, CcState.unsupported, CcState.unknown])
def test_other_cc_states_are_basic(pki: DevicePki, key: X25519PrivateKey, state) -> None:
    evidence = _evidence(pki, _public(key))
    decision = _decide(evidence, _public(key), SignedReportVerifier([pki.root]), state)
    assert decision.tier is TrustTier.basic


def test_devtools_reading_maps_to_devtools() -> None:
    assert H100_CC_DEVTOOLS.cc.state is CcState.devtools


def test_cc_on_without_evidence_or_verifier_is_basic(pki: DevicePki, key: X25519PrivateKey) -> None:
    none = _decide(None, _public(key), SignedReportVerifier([pki.root]))
    assert none.tier is TrustTier.basic and "no evidence" in none.reason
    unverified = _decide(_evidence(pki, _public(key)), _public(key), NoVerifier())
    assert unverified.tier is TrustTier.basic and "no confidential-computing verifier" in (
        unverified.reason
    )


def test_evidence_made_for_another_key_is_refused(pki: DevicePki, key: X25519PrivateKey) -> None:
    stolen = _evidence(pki, _public(X25519PrivateKey.generate()))
    decision = _decide(stolen, _public(key), SignedReportVerifier([pki.root]))
    assert decision.tier is TrustTier.basic and "does not bind this key" in decision.reason


def test_a_report_over_another_nonce_is_refused(pki: DevicePki, key: X25519PrivateKey) -> None:
    evidence = _evidence(pki, _public(key))
    report, chain = pki.sign_report(0, b"\0" * 32)  # a genuine report, wrong nonce
    forged = evidence.model_copy(
        update={
            "gpus": [
                evidence.gpus[0].model_copy(update={"report": base64.b64encode(report).decode()})
            ]
        }
    )
    decision = _decide(forged, _public(key), SignedReportVerifier([pki.root]))
    assert decision.tier is TrustTier.basic and "does not carry the nonce" in decision.reason


def test_an_untrusted_root_or_bad_signature_is_refused(
    pki: DevicePki, key: X25519PrivateKey
) -> None:
    evidence = _evidence(pki, _public(key))
    other_root = DevicePki.make("Someone Else's CA").root
    untrusted = _decide(evidence, _public(key), SignedReportVerifier([other_root]))
    assert untrusted.tier is TrustTier.basic and "trusted root" in untrusted.reason

    raw = bytearray(base64.b64decode(evidence.gpus[0].report))
    raw[40] ^= 0xFF  # a measurement byte changed after signing
    tampered = evidence.model_copy(
        update={
            "gpus": [evidence.gpus[0].model_copy(update={"report": base64.b64encode(raw).decode()})]
        }
    )
    bad = _decide(tampered, _public(key), SignedReportVerifier([pki.root]))
    assert bad.tier is TrustTier.basic and "signature is not valid" in bad.reason


def test_stale_or_foreign_challenges_are_refused(pki: DevicePki, key: X25519PrivateKey) -> None:
    evidence = _evidence(pki, _public(key), provider="prv_1")
    verifier = SignedReportVerifier([pki.root])
    late = _decide(evidence, _public(key), verifier, now=NOW + 3600)
    assert late.tier is TrustTier.basic and "expired" in late.reason
    other = _decide(evidence, _public(key), verifier, provider_id="prv_2")
    assert other.tier is TrustTier.basic and "not one of ours" in other.reason


def test_no_report_where_cc_is_off() -> None:
    import pynvml

    reader = RecordedReader(H100, report_signer=DevicePki.make().sign_report)
    reader.read()
    with pytest.raises(pynvml.NVMLError):
        reader.attestation_report(0, b"\0" * 32)
