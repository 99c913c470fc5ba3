"""A stand-in for Stripe's API at the one boundary tests cannot reach: an `HTTPClient` that
stripe-python's real `StripeClient` talks to (form-encoded requests in, JSON out), keeping
state like Stripe does for every call DarkGPU makes:

- `POST /v1/checkout/sessions`, `GET /v1/checkout/sessions/:id`, `GET /v1/payment_intents/:id`,
  `POST /v1/accounts`, `POST /v1/account_links`, `POST /v1/transfers`;
- balance transactions as Stripe keeps them: one per charge (`fee` at card pricing, 2.9% +
  30¢ by default, with `fee_details`, `net = amount - fee`, `available_on`), per refund (no
  fee back unless the test says so) and per dispute (the $15 dispute fee; a won dispute's
  reinstatement returns it); `GET /v1/balance_transactions/:id`, `/v1/charges/:id`,
  `/v1/refunds/:id`, `/v1/disputes/:id`, and the lists `GET /v1/refunds` and
  `GET /v1/disputes` (filtered by `charge` or `payment_intent`, newest first, `limit` 1–100,
  `starting_after`); the platform's available balance moves by each transaction's `net`;
- `expand[]` on every read, to four levels (`latest_charge.balance_transaction`,
  `data.balance_transaction` on a list), with Stripe's errors for a property that cannot be
  expanded and for more than four levels;
- ids as Stripe makes them (`cs_test_…`, `pi_…`, `ch_…`, `re_…`, `dp_…`, `txn_…`, `acct_…`,
  `tr_…`, `evt_…`);
- Stripe's error bodies and statuses: missing parameters, unknown objects
  (`resource_missing`), `balance_insufficient` when the platform's available balance is short,
  `insufficient_capabilities_for_transfer` for a destination that cannot receive transfers,
  an invalid API key (401), unknown URLs (404);
- idempotency keys: the same key with the same parameters replays the first answer
  (`Idempotent-Replayed: true`), errors included; with other parameters it is a 400
  `idempotency_error`.

What happens outside the API (a customer paying, refunding from the dashboard, a dispute,
finishing Connect onboarding) is done by the test through helper methods, which return the
objects that Stripe's webhook events would carry; `event()` wraps one as an event and
`signed()` signs it like Stripe does.
"""

from __future__ import annotations

import itertools
import json
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import stripe

API_KEY = "sk_test_darkgpu_fake"
WEBHOOK_SECRET = "whsec_test_darkgpu_fake"
API_VERSION = "2025-01-27.acacia"


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def decode_form(body: str) -> dict[str, Any]:
    """Stripe's form encoding (`a[b][0][c]=v`) back into nested dicts and lists."""
    root: dict[str, Any] = {}
    for key, value in parse_qsl(body, keep_blank_values=True):
        parts = key.replace("]", "").split("[")
        node: Any = root
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            nxt_is_index = not last and parts[i + 1].isdigit()
            if isinstance(node, list):
                idx = int(part)
                while len(node) <= idx:
                    node.append(None)
                if last:
                    node[idx] = value
                else:
                    if node[idx] is None:
                        node[idx] = [] if nxt_is_index else {}
                    node = node[idx]
            else:
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, [] if nxt_is_index else {})
    return root


class StripeAPIError(Exception):
    def __init__(self, status: int, type_: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"type": type_, "message": message, **extra}}


def _missing(param: str) -> StripeAPIError:
    return StripeAPIError(
        400, "invalid_request_error", f"Missing required param: {param}.", param=param,
        code="parameter_missing",
    )  # fmt: skip


def _no_such(kind: str, ident: str, param: str | None = None) -> StripeAPIError:
    extra = {"param": param} if param else {}
    return StripeAPIError(
        404 if param is None else 400,
        "invalid_request_error",
        f"No such {kind}: '{ident}'",
        code="resource_missing",
        **extra,
    )


CARD_PERCENT_BP = 290  # US card pricing: 2.9% …
CARD_FIXED_CENTS = 30  # … + 30¢ per successful charge
DISPUTE_FEE_CENTS = 1500
AVAILABLE_AFTER_S = 2 * 86400  # card funds become available two days later
MAX_EXPAND_DEPTH = 4


def card_fee(amount_cents: int) -> int:
    """Stripe's fee on a card charge (2.9% + 30¢, rounded half up to the cent)."""
    return (amount_cents * CARD_PERCENT_BP + 5_000) // 10_000 + CARD_FIXED_CENTS


class FakeStripe(stripe.HTTPClient):
    name = "fake-stripe"

    def __init__(self, *, available_cents: int = 0) -> None:
        super().__init__()
        self.available_cents = available_cents  # the platform's available balance
        self.sessions: dict[str, dict[str, Any]] = {}
        self.intents: dict[str, dict[str, Any]] = {}
        self.charges: dict[str, dict[str, Any]] = {}
        self.refunds: dict[str, dict[str, Any]] = {}
        self.disputes: dict[str, dict[str, Any]] = {}
        self.balance_transactions: dict[str, dict[str, Any]] = {}
        # a charge whose balance transaction Stripe has not attached yet (`null` on the charge)
        self.hold_balance_transactions = False
        self.accounts: dict[str, dict[str, Any]] = {}
        self.transfers: dict[str, dict[str, Any]] = {}
        self._pi_metadata: dict[str, dict[str, Any]] = {}
        self.idempotent: dict[str, tuple[str, str, str, tuple[str, int, dict[str, str]]]] = {}
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.lose_next_response = False  # do the work, then "lose" the answer (network)
        self._clock = itertools.count(int(time.time()))

    # --- the HTTPClient interface ---------------------------------------------------------

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[str, int, dict[str, str]]:
        headers = dict(headers or {})
        parts = urlsplit(url)
        body = post_data.decode() if isinstance(post_data, bytes) else (post_data or "")
        params = decode_form(body if method == "post" else parts.query)
        self.calls.append((method.upper(), parts.path, params))
        key = headers.get("Idempotency-Key")
        if key and key in self.idempotent:
            m, path, seen_body, answer = self.idempotent[key]
            if (m, path, seen_body) != (method, parts.path, body):
                return self._answer(
                    StripeAPIError(
                        400,
                        "idempotency_error",
                        "Keys for idempotent requests can only be used with the same "
                        "parameters they were first used with. Try using a key other than "
                        f"'{key}' if you meant to execute a different request.",
                    )
                )
            text, status, rheaders = answer
            return text, status, {**rheaders, "Idempotent-Replayed": "true"}
        answer = self._dispatch(method, parts.path, params, headers)
        if key and method == "post" and answer[1] < 500:
            self.idempotent[key] = (method, parts.path, body, answer)
        if self.lose_next_response:
            self.lose_next_response = False
            raise stripe.APIConnectionError("Connection reset by peer (the fake lost the answer)")
        return answer

    def request_stream(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass

    # --- routing ----------------------------------------------------------------------------

    def _answer(self, result: dict[str, Any] | StripeAPIError) -> tuple[str, int, dict[str, str]]:
        rheaders = {"Request-Id": _id("req"), "Content-Type": "application/json"}
        if isinstance(result, StripeAPIError):
            return json.dumps(result.body), result.status, rheaders
        return json.dumps(result), 200, rheaders

    def _dispatch(
        self, method: str, path: str, params: dict[str, Any], headers: dict[str, str]
    ) -> tuple[str, int, dict[str, str]]:
        if headers.get("Authorization") != f"Bearer {API_KEY}":
            return self._answer(
                StripeAPIError(401, "invalid_request_error", "Invalid API Key provided: sk_***")
            )
        seg = path.strip("/").split("/")
        routes = {
            ("post", "checkout/sessions"): lambda: self._create_session(params),
            ("post", "accounts"): lambda: self._create_account(params),
            ("post", "account_links"): lambda: self._create_link(params),
            ("post", "transfers"): lambda: self._create_transfer(params),
        }
        try:
            if seg[0] != "v1":
                raise self._unknown(method, path)
            name = "/".join(seg[1:])
            if (method, name) in routes:
                return self._answer(routes[(method, name)]())
            if method == "get" and len(seg) == 4 and seg[1:3] == ["checkout", "sessions"]:
                found = self._get(self.sessions, seg[3], "checkout.session")
                return self._answer(self._expanded(found, params))
            tables = {
                "payment_intents": (self.intents, "payment_intent"),
                "transfers": (self.transfers, "transfer"),
                "charges": (self.charges, "charge"),
                "refunds": (self.refunds, "refund"),
                "disputes": (self.disputes, "dispute"),
                "balance_transactions": (self.balance_transactions, "balance_transaction"),
            }
            if method == "get" and len(seg) == 3 and seg[1] in tables:
                table, kind = tables[seg[1]]
                return self._answer(self._expanded(self._get(table, seg[2], kind), params))
            if method == "get" and len(seg) == 2 and seg[1] in ("refunds", "disputes"):
                return self._answer(self._list(seg[1], tables[seg[1]][0], params))
            raise self._unknown(method, path)
        except StripeAPIError as exc:
            return self._answer(exc)

    @staticmethod
    def _unknown(method: str, path: str) -> StripeAPIError:
        return StripeAPIError(
            404, "invalid_request_error", f"Unrecognized request URL ({method.upper()}: {path})."
        )

    @staticmethod
    def _get(table: dict[str, dict[str, Any]], ident: str, kind: str) -> dict[str, Any]:
        if ident not in table:
            raise _no_such(kind, ident)
        return table[ident]

    # --- expansion and lists (what Stripe does for every read) -----------------------------

    EXPANDABLE = {
        "checkout.session": {"payment_intent": "intents"},
        "payment_intent": {"latest_charge": "charges"},
        "charge": {"balance_transaction": "balance_transactions", "payment_intent": "intents"},
        "refund": {
            "balance_transaction": "balance_transactions",
            "charge": "charges",
            "payment_intent": "intents",
        },
        "dispute": {"charge": "charges", "payment_intent": "intents"},
        "balance_transaction": {"source": "*"},
        "transfer": {"balance_transaction": "balance_transactions"},
    }

    def _expanded(self, obj: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        paths = params.get("expand") or []
        if isinstance(paths, str) or not isinstance(paths, list):
            raise StripeAPIError(400, "invalid_request_error", "Invalid array", param="expand")
        out = json.loads(json.dumps(obj))
        for path in paths:
            parts = str(path).split(".")
            if len(parts) > MAX_EXPAND_DEPTH:
                raise StripeAPIError(
                    400,
                    "invalid_request_error",
                    "You cannot expand more than 4 levels of a property.",
                    param="expand",
                )
            self._expand_path(out, parts, str(path))
        return out

    def _expand_path(self, obj: dict[str, Any], parts: list[str], path: str) -> None:
        head, rest = parts[0], parts[1:]
        if obj.get("object") == "list" and head == "data":
            for item in obj["data"]:
                if rest:
                    self._expand_path(item, rest, path)
            return
        fields = self.EXPANDABLE.get(str(obj.get("object")), {})
        if head not in fields:
            hint = ""
            if obj.get("object") == "list":
                hint = f" You may want to try expanding 'data.{path}' instead."
            raise StripeAPIError(
                400,
                "invalid_request_error",
                f"This property cannot be expanded ({head}).{hint}",
            )
        value = obj.get(head)
        if isinstance(value, str):
            value = json.loads(json.dumps(self._by_id(value)))
            obj[head] = value
        if rest and isinstance(value, dict):
            self._expand_path(value, rest, path)

    def _by_id(self, ident: str) -> dict[str, Any]:
        for table in (
            self.intents,
            self.charges,
            self.refunds,
            self.disputes,
            self.balance_transactions,
            self.transfers,
            self.sessions,
        ):
            if ident in table:
                return table[ident]
        raise _no_such("object", ident)

    def _list(
        self, name: str, table: dict[str, dict[str, Any]], params: dict[str, Any]
    ) -> dict[str, Any]:
        try:
            limit = int(params.get("limit", 10))
        except ValueError:
            raise StripeAPIError(
                400, "invalid_request_error", "Invalid integer: " + str(params["limit"]),
                param="limit",
            ) from None  # fmt: skip
        if not 1 <= limit <= 100:
            raise StripeAPIError(
                400,
                "invalid_request_error",
                f"This value must be less than or equal to 100 (it currently is '{limit}').",
                param="limit",
            )
        found = [
            item
            for item in table.values()
            if all(
                params.get(f) is None or item.get(f) == params[f]
                for f in ("charge", "payment_intent")
            )
        ]
        found.sort(key=lambda item: (item["created"], item["id"]), reverse=True)  # newest first
        after = params.get("starting_after")
        if after:
            ids = [item["id"] for item in found]
            if after not in ids:
                raise _no_such(name.rstrip("s"), after, "starting_after")
            found = found[ids.index(after) + 1 :]
        page = {
            "object": "list",
            "data": found[:limit],
            "has_more": len(found) > limit,
            "url": f"/v1/{name}",
        }
        return self._expanded(page, params)

    # --- balance transactions ---------------------------------------------------------------

    def _transaction(
        self,
        *,
        amount: int,
        fee: int,
        source: str,
        type_: str,
        category: str,
        fee_description: str,
        currency: str = "usd",
    ) -> str:
        """Book a balance transaction (and move the available balance by its net)."""
        created = next(self._clock)
        ident = _id("txn")
        details = []
        if fee:
            details.append(
                {
                    "amount": fee,
                    "application": None,
                    "currency": currency,
                    "description": fee_description,
                    "type": "stripe_fee",
                }
            )
        self.balance_transactions[ident] = {
            "id": ident,
            "object": "balance_transaction",
            "amount": amount,
            "available_on": created + AVAILABLE_AFTER_S,
            "balance_type": "payments",
            "created": created,
            "currency": currency,
            "description": None,
            "exchange_rate": None,
            "fee": fee,
            "fee_details": details,
            "net": amount - fee,
            "reporting_category": category,
            "source": source,
            "status": "pending",
            "type": type_,
        }
        self.available_cents += amount - fee
        return ident

    def _charge_transaction(self, charge: dict[str, Any]) -> None:
        charge["balance_transaction"] = self._transaction(
            amount=charge["amount"],
            fee=card_fee(charge["amount"]),
            source=charge["id"],
            type_="charge",
            category="charge",
            fee_description="Stripe processing fees",
            currency=charge["currency"],
        )

    def attach_balance_transactions(self) -> None:
        """Stripe attaches the balance transactions it held back (`hold_balance_transactions`)."""
        self.hold_balance_transactions = False
        for charge in self.charges.values():
            if charge["status"] == "succeeded" and charge["balance_transaction"] is None:
                self._charge_transaction(charge)

    def charge_fee(self, session_id: str) -> int:
        """The fee Stripe took on the session's charge, in cents."""
        txn = self._charge_of(session_id)["balance_transaction"]
        return int(self.balance_transactions[txn]["fee"])

    def net_cents(self) -> int:
        """What every balance transaction added to the platform's balance, net of fees."""
        return sum(int(t["net"]) for t in self.balance_transactions.values())

    def fees_cents(self) -> int:
        return sum(int(t["fee"]) for t in self.balance_transactions.values())

    # --- Checkout -------------------------------------------------------------------------

    def _create_session(self, p: dict[str, Any]) -> dict[str, Any]:
        for name in ("mode", "line_items", "success_url"):
            if not p.get(name):
                raise _missing(name)
        if p["mode"] != "payment":
            raise StripeAPIError(400, "invalid_request_error", "Invalid mode", param="mode")
        total, currency = 0, None
        for i, item in enumerate(p["line_items"]):
            data = item.get("price_data") or {}
            if "unit_amount" not in data or "currency" not in data:
                raise _missing(f"line_items[{i}][price_data][unit_amount]")
            if not (data.get("product_data") or {}).get("name"):
                raise _missing(f"line_items[{i}][price_data][product_data][name]")
            total += int(data["unit_amount"]) * int(item.get("quantity", 1))
            currency = data["currency"]
        ident = "cs_test_" + secrets.token_hex(24)
        session = {
            "id": ident,
            "object": "checkout.session",
            "mode": "payment",
            "status": "open",
            "payment_status": "unpaid",
            "amount_total": total,
            "amount_subtotal": total,
            "currency": currency,
            "client_reference_id": p.get("client_reference_id"),
            "customer_email": p.get("customer_email"),
            "metadata": p.get("metadata") or {},
            "payment_intent": None,
            "success_url": p["success_url"],
            "cancel_url": p.get("cancel_url"),
            "url": f"https://checkout.stripe.com/c/pay/{ident}",
            "created": next(self._clock),
            "expires_at": next(self._clock) + 86400,
            "livemode": False,
        }
        self.sessions[ident] = session
        self._pi_metadata[ident] = (p.get("payment_intent_data") or {}).get("metadata") or {}
        return session

    def pay(self, session_id: str, *, delayed: bool = False) -> dict[str, Any]:
        """The customer pays: a PaymentIntent and its Charge; card money is available at once
        (a test simplification). `delayed`: a bank debit, still processing."""
        session = self.sessions[session_id]
        pi, ch = _id("pi"), _id("ch")
        amount = session["amount_total"]
        self.intents[pi] = {
            "id": pi,
            "object": "payment_intent",
            "amount": amount,
            "currency": session["currency"],
            "status": "processing" if delayed else "succeeded",
            "metadata": self._pi_metadata[session_id],
            "latest_charge": ch,
        }
        self.charges[ch] = {
            "id": ch,
            "object": "charge",
            "amount": amount,
            "amount_refunded": 0,
            "refunded": False,
            "disputed": False,
            "currency": session["currency"],
            "payment_intent": pi,
            "metadata": dict(self._pi_metadata[session_id]),
            "status": "pending" if delayed else "succeeded",
            "balance_transaction": None,
            "created": next(self._clock),
        }
        session.update(
            status="complete", payment_intent=pi, payment_status="unpaid" if delayed else "paid"
        )
        if not delayed and not self.hold_balance_transactions:
            self._charge_transaction(self.charges[ch])
        return dict(session)

    def settle_delayed(self, session_id: str, *, succeeded: bool = True) -> dict[str, Any]:
        session = self.sessions[session_id]
        pi = self.intents[session["payment_intent"]]
        pi["status"] = "succeeded" if succeeded else "requires_payment_method"
        charge = self.charges[pi["latest_charge"]]
        charge["status"] = "succeeded" if succeeded else "failed"
        if succeeded:
            session["payment_status"] = "paid"
            if not self.hold_balance_transactions:
                self._charge_transaction(charge)
        return dict(session)

    def refund(self, session_id: str, cents: int, *, fee_returned: int = 0) -> dict[str, Any]:
        """A refund from the dashboard; returns the charge (cumulative `amount_refunded`).
        Stripe keeps its processing fee on a refund; `fee_returned` (cents) books one where it
        does return part of it (a negative fee on the refund's balance transaction)."""
        charge = self._charge_of(session_id)
        if charge["amount_refunded"] + cents > charge["amount"]:
            raise ValueError("refund larger than the charge")
        charge["amount_refunded"] += cents
        charge["refunded"] = charge["amount_refunded"] == charge["amount"]
        ident = _id("re")
        txn = self._transaction(
            amount=-cents,
            fee=-fee_returned,
            source=ident,
            type_="refund",
            category="refund",
            fee_description="Refund of Stripe processing fees",
            currency=charge["currency"],
        )
        self.refunds[ident] = {
            "id": ident,
            "object": "refund",
            "amount": cents,
            "balance_transaction": txn,
            "charge": charge["id"],
            "created": self.balance_transactions[txn]["created"],
            "currency": charge["currency"],
            "metadata": {},
            "payment_intent": charge["payment_intent"],
            "reason": None,
            "status": "succeeded",
        }
        return dict(charge)

    def dispute(self, session_id: str, cents: int | None = None) -> dict[str, Any]:
        """The customer's bank disputes the charge: the amount and the dispute fee leave the
        balance in one balance transaction, listed on the dispute."""
        charge = self._charge_of(session_id)
        charge["disputed"] = True
        amount = charge["amount"] if cents is None else cents
        ident = _id("dp")
        txn = self._transaction(
            amount=-amount,
            fee=DISPUTE_FEE_CENTS,
            source=ident,
            type_="adjustment",
            category="dispute",
            fee_description="Dispute fee",
            currency=charge["currency"],
        )
        self.disputes[ident] = {
            "id": ident,
            "object": "dispute",
            "amount": amount,
            "balance_transactions": [self.balance_transactions[txn]],
            "created": self.balance_transactions[txn]["created"],
            "currency": charge["currency"],
            "charge": charge["id"],
            "payment_intent": charge["payment_intent"],
            "reason": "fraudulent",
            "status": "needs_response",
            "metadata": {},
        }
        return json.loads(json.dumps(self.disputes[ident]))

    def close_dispute(self, dispute_id: str, *, won: bool) -> dict[str, Any]:
        """The bank decides: a won dispute reinstates the amount and returns the dispute fee
        (a second balance transaction on the dispute); a lost one moves nothing more."""
        dispute = self.disputes[dispute_id]
        dispute["status"] = "won" if won else "lost"
        if won:
            txn = self._transaction(
                amount=dispute["amount"],
                fee=-DISPUTE_FEE_CENTS,
                source=dispute_id,
                type_="adjustment",
                category="dispute_reversal",
                fee_description="Dispute fee refund",
                currency=dispute["currency"],
            )
            dispute["balance_transactions"].append(self.balance_transactions[txn])
        return json.loads(json.dumps(dispute))

    def _charge_of(self, session_id: str) -> dict[str, Any]:
        pi = self.intents[self.sessions[session_id]["payment_intent"]]
        return self.charges[pi["latest_charge"]]

    # --- Connect ----------------------------------------------------------------------------

    def _create_account(self, p: dict[str, Any]) -> dict[str, Any]:
        if p.get("type") not in ("express", "standard", "custom") and not p.get("controller"):
            raise _missing("type")
        ident = "acct_" + secrets.token_hex(8).upper()
        account = {
            "id": ident,
            "object": "account",
            "type": p.get("type"),
            "email": p.get("email"),
            "charges_enabled": False,
            "payouts_enabled": False,
            "details_submitted": False,
            "capabilities": {"transfers": "inactive"},
            "metadata": p.get("metadata") or {},
            "created": next(self._clock),
        }
        self.accounts[ident] = account
        return account

    def _create_link(self, p: dict[str, Any]) -> dict[str, Any]:
        for name in ("account", "type"):
            if not p.get(name):
                raise _missing(name)
        if p["account"] not in self.accounts:
            raise _no_such("account", p["account"], "account")
        if p["type"] not in ("account_onboarding", "account_update"):
            raise StripeAPIError(400, "invalid_request_error", "Invalid type", param="type")
        if p["type"] == "account_onboarding" and not p.get("return_url"):
            raise _missing("return_url")
        now = next(self._clock)
        return {
            "object": "account_link",
            "created": now,
            "expires_at": now + 300,
            "url": f"https://connect.stripe.com/setup/e/{p['account']}/{secrets.token_hex(8)}",
        }

    def onboard(self, account_id: str, *, enabled: bool = True) -> dict[str, Any]:
        """The provider finishes (or loses) onboarding; returns the account for the event."""
        account = self.accounts[account_id]
        account.update(
            details_submitted=True,
            payouts_enabled=enabled,
            charges_enabled=enabled,
            capabilities={"transfers": "active" if enabled else "inactive"},
        )
        return dict(account)

    def _create_transfer(self, p: dict[str, Any]) -> dict[str, Any]:
        for name in ("amount", "currency", "destination"):
            if not p.get(name):
                raise _missing(name)
        amount = int(p["amount"])
        if amount <= 0:
            raise StripeAPIError(
                400, "invalid_request_error", "This value must be greater than or equal to 1.",
                param="amount",
            )  # fmt: skip
        dest = self.accounts.get(p["destination"])
        if dest is None:
            raise _no_such("destination", p["destination"], "destination")
        if dest["capabilities"].get("transfers") != "active":
            raise StripeAPIError(
                400,
                "invalid_request_error",
                "Your destination account needs to have at least one of the following "
                "capabilities enabled: transfers, crypto_transfers, legacy_payments",
                code="insufficient_capabilities_for_transfer",
                param="destination",
            )
        if amount > self.available_cents:
            raise StripeAPIError(
                400,
                "invalid_request_error",
                "You have insufficient available funds in your Stripe account. Try adding "
                "funds directly to your available balance by creating Charges using the "
                "4000000000000077 test card. See: https://stripe.com/docs/testing#available-balance",
                code="balance_insufficient",
            )
        self.available_cents -= amount
        ident = _id("tr")
        transfer = {
            "id": ident,
            "object": "transfer",
            "amount": amount,
            "amount_reversed": 0,
            "currency": p["currency"],
            "destination": p["destination"],
            "transfer_group": p.get("transfer_group"),
            "description": p.get("description"),
            "metadata": p.get("metadata") or {},
            "balance_transaction": _id("txn"),
            "reversed": False,
            "created": next(self._clock),
            "livemode": False,
        }
        self.transfers[ident] = transfer
        return transfer

    # --- webhooks ---------------------------------------------------------------------------

    def event(self, type_: str, obj: dict[str, Any], *, created: int | None = None) -> str:
        """The JSON body of a webhook event carrying `obj`."""
        return json.dumps(
            {
                "id": _id("evt"),
                "object": "event",
                "api_version": API_VERSION,
                "created": created if created is not None else next(self._clock),
                "data": {"object": obj},
                "livemode": False,
                "pending_webhooks": 1,
                "request": {"id": None, "idempotency_key": None},
                "type": type_,
            }
        )


def signed(payload: str, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    """The Stripe-Signature header for `payload`, made the way Stripe makes it."""
    return stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp)


def client_for(fake: FakeStripe) -> stripe.StripeClient:
    return stripe.StripeClient(API_KEY, http_client=fake, max_network_retries=0)


@contextmanager
def serve(fake: FakeStripe, port: int = 0) -> Iterator[str]:
    """The fake over real HTTP (for a platform running in other processes: point
    `DARKGPU_STRIPE_API_BASE` at the address this yields)."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            size = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(size).decode() if size else None
            with lock:
                try:
                    text, status, rheaders = fake.request(
                        self.command.lower(), "http://fake" + self.path, dict(self.headers), body
                    )
                except stripe.APIConnectionError:
                    self.close_connection = True
                    return
            data = text.encode()
            self.send_response(status)
            for name, value in rheaders.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _any

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
