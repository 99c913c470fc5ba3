"""Completions of the tiny model whose length the ingress's recount reproduces exactly.

The ingress bills its own count of the text it delivered (`serve_app.recount`), never more
than the engine reported. The tiny model's random weights pick random byte-level tokens, and
their text may tokenize back into fewer (two byte tokens of one UTF-8 character are one
token, or none when they decode to nothing), so `ignore_eos` alone made "exactly max_tokens
billed" fail now and then (CI: 7 billed of 8). `EXACT` also lets the engine pick only one
token, a whole word with its space, `" robot"`: n of them tokenize back into n.
"""

from __future__ import annotations

from cluster.local_model import build_tokenizer

WORD = " robot"
WORD_ID: int = build_tokenizer().convert_tokens_to_ids("Ġrobot")
EXACT = {"ignore_eos": True, "allowed_token_ids": [WORD_ID]}
