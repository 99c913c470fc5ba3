from pathlib import Path

import pytest

from billing.plans import Plans, PlansError, load_plans


def test_plans_file_matches_the_spec(plans: Plans) -> None:
    free, paid, enterprise = plans.get("free"), plans.get("paid"), plans.get("enterprise")
    assert (free.requests_per_minute, free.tokens_per_day) == (60, 200_000)
    assert free.signup_grant_nusd == 10 * 10**9
    assert (paid.requests_per_minute, paid.tokens_per_day) == (600, None)
    assert paid.signup_grant_nusd == 0
    assert enterprise.custom
    assert plans.default_plan == "free"
    bundles = {name: (b.price_cents, b.default_tokens_per_day) for name, b in plans.bundles.items()}
    assert bundles == {"solo": (5000, 2000), "team": (15000, 7000), "scale": (30000, 15000)}
    assert plans.bundles["solo"].price_nusd == 50 * 10**9


def test_unknown_plan(plans: Plans) -> None:
    with pytest.raises(KeyError, match="unknown plan"):
        plans.get("gold")


def test_invalid_plans_file_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "plans.toml"
    path.write_text('[plans.free]\nrequests_per_minute = 0\nsignup_grant_usd = "0.0000000001"\n')
    with pytest.raises(PlansError) as err:
        load_plans(path)
    assert "plans.free.requests_per_minute" in str(err.value)
    assert "signup_grant_usd" in str(err.value)


def test_missing_plans_file(tmp_path: Path) -> None:
    with pytest.raises(PlansError, match="cannot read"):
        load_plans(tmp_path / "nope.toml")
