"""The hash chain's canonical form is pinned: rows already in a ledger must keep verifying, so
a change to the usage event's fields (kernel.usage_event) that changes it fails here."""

from billing import chain
from kernel.usage_event import UsageRecord

ROW = UsageRecord(
    request_id="req-1",
    account_id=7,
    key_id=3,
    customer_tag="acme",
    model="m",
    provider_id="prv_a",
    prompt_tokens=10,
    completion_tokens=20,
    input_nusd_per_token=1000,
    output_nusd_per_token=2000,
    cost_nusd=50000,
    provider_share_nusd=47500,
    platform_share_nusd=2500,
    outcome="settled",
    usage_day="2026-11-24",
    created_at_ms=1,
    settled_at_ms=2,
)
# computed by the chain as it was before the usage event had a type of its own
FIRST = "f04cd45bfefb2dadc29c83724ba167548681a4884d5e357e092bed4663566297"
SECOND = "0aac291859138f92f80d7c191cf982f4b0f9087621d891e3e03cbfcb9a19267c"


def test_the_canonical_form_and_hashes_do_not_change() -> None:
    assert chain.canonical(ROW) == (
        '{"account_id":7,"completion_tokens":20,"cost_nusd":50000,"created_at_ms":1,'
        '"customer_tag":"acme","input_nusd_per_token":1000,"key_id":3,"model":"m",'
        '"outcome":"settled","output_nusd_per_token":2000,"platform_share_nusd":2500,'
        '"prompt_tokens":10,"provider_id":"prv_a","provider_share_nusd":47500,'
        '"request_id":"req-1","settled_at_ms":2,"usage_day":"2026-11-24"}'
    )
    first = chain.row_hash(chain.GENESIS, ROW)
    assert first == FIRST
    second = UsageRecord(
        **{**ROW.row(), "request_id": "req-2", "key_id": None, "customer_tag": None}
    )
    assert chain.row_hash(first, second) == SECOND


def test_the_engines_report_is_hashed_where_it_is_known() -> None:
    """Rows written before `reported_completion_tokens` existed hold NULL there and keep
    their form (the pinned hashes above); a row that has it is covered by its hash, so it
    cannot be rewritten (a provider's over-report hidden) without breaking the chain."""
    reported = UsageRecord(**{**ROW.row(), "reported_completion_tokens": 25})
    assert chain.canonical(reported) == chain.canonical(ROW).replace(
        '"provider_share_nusd":47500,',
        '"provider_share_nusd":47500,"reported_completion_tokens":25,',
    )
    digest = chain.row_hash(chain.GENESIS, reported)
    assert digest != FIRST
    rewritten = UsageRecord(**{**reported.row(), "reported_completion_tokens": 20})
    assert chain.row_hash(chain.GENESIS, rewritten) != digest
    assert chain.row_hash(chain.GENESIS, ROW) == FIRST  # NULL: the form rows had before
