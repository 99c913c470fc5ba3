"""Redis Lua scripts for admission, settlement, reaping and rebuild (names in kernel.redis_keys).

Lua 5.1 numbers are doubles: every integer below 2**53 is exact, and money stays below that
(kernel.money.MAX_BALANCE_NUSD). Numbers are turned into strings with `string.format('%d')`
only, never `tostring` or `..` (those keep 14 digits). Division goes through `idiv`, exact for
non-negative integers.

What settlement shares with Python is formatted into the script from Python, not copied: the
usage event's fields (kernel.usage_event.FIELDS, in order: a field without a Lua value here
fails at import) and the provider's share (kernel.money.PROVIDER_SHARE_PCT).

A hold (`dg:hold:<request id>`) is a hash. `admit` writes the reservation: account, key_id,
day, day_end, tag, model, pin and pout (the reserved prices per token), prompt, max (the
completions' tokens), cost and created (ms). A stream's ingress adds its last checkpoint of
the usage delivered so far (`CHECKPOINT`): cp_prompt, cp_completion, cp_provider (who serves
it), cp_pin and cp_pout (that provider's prices; '' for the reserved ones) and cp_at (ms).
Its expiry is its score in `dg:holds`, pushed forward while the request lives (`EXTEND`,
`CHECKPOINT`). `SETTLE` and `REAP` both end it through `settle_one`, which deletes it in the
same script: whichever runs first bills, the other finds no hold and bills nothing.
"""

from __future__ import annotations

from kernel.money import PROVIDER_SHARE_PCT
from kernel.usage_event import FIELDS

COMMON = r"""
local function s(n) return string.format('%d', n) end
local function idiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end
local DAY_GRACE_MS = 86400000
"""

# KEYS: 1 key hash, 2 hold, 3 done marker, 4 holds zset, 5 ready
# ARGV: 1 now_ms, 2 day YYYYMMDD, 3 day_end_ms, 4 tag ('' none), 5 prompt, 6 max_tokens,
#       7 input price, 8 output price, 9 hold ttl ms, 10 model, 11 plans json, 12 request id,
#       13 completions (sequences the engine generates: prompts x n; absent: 1)
# max_tokens is per completion: the reservation is prompt + max_tokens x completions, and the
# granted max_tokens (per completion) is lowered until that fits the caps and the balance.
# Reply: {outcome, account, key_id, granted, rpm_limit, rpm_remaining, rpm_reset_ms,
#         tok_limit, tok_remaining, tok_reset_ms, retry_after_ms, balance, room}
ADMIT = (
    COMMON
    + r"""
local now, day, day_end, tag = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), ARGV[4]
local prompt, want = tonumber(ARGV[5]), tonumber(ARGV[6])
local pin, pout, ttl, rid = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), ARGV[12]
local copies = math.max(tonumber(ARGV[13] or '1') or 1, 1)
local function reply(...)
  local out = {...}
  for i = 1, select('#', ...) do
    local v = out[i]
    if type(v) == 'number' then out[i] = s(v) elseif not v then out[i] = '' end
  end
  return table.concat(out, '|', 1, select('#', ...))
end

if redis.call('EXISTS', KEYS[5]) == 0 then return reply('cold') end
local k = redis.call('HMGET', KEYS[1], 'account', 'key_id', 'tpd')
local acct, key_id, keycap = k[1], k[2], tonumber(k[3])
if not acct then return reply('nokey') end
local a = redis.call('HMGET', 'dg:acct:' .. acct, 'plan', 'status', 'rpm', 'tpd', 'own')
local plan = a[1] and cjson.decode(ARGV[11])[a[1]]
if not plan or a[2] ~= 'active' then return reply('disabled', acct, key_id) end
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('EXISTS', KEYS[3]) == 1 then
  return reply('dup', acct, key_id)
end
local rpm = tonumber(a[3]) or plan[1]
local tpd = tonumber(a[4]) or plan[2]
local own = tonumber(a[5])  -- the customer's own cap only lowers it (billing.plans.daily_cap)
if own and (tpd < 0 or own < tpd) then tpd = own end

-- daily token room (-1: no cap), the tightest of the account's, the key's and the tag's caps
local daykey = 'dg:day:' .. acct .. ':' .. day
local tagdaykey = 'dg:tagday:' .. acct .. ':' .. day
local keydaykey = 'dg:keyday:' .. acct .. ':' .. day
local used = tonumber(redis.call('GET', daykey) or '0')
local room, tok_limit, bound = -1, -1, 'cap'
if tpd >= 0 then room = math.max(tpd - used, 0); tok_limit = tpd end
if tag ~= '' then
  local tc = redis.call('HMGET', 'dg:tagcap:' .. acct, tag, '*')
  local tagcap = tonumber(tc[1] or tc[2])
  if tagcap then
    local tagused = tonumber(redis.call('HGET', tagdaykey, tag) or '0')
    local troom = math.max(tagcap - tagused, 0)
    if room < 0 or troom < room then room = troom; tok_limit = tagcap; bound = 'tagcap' end
  end
end
if keycap then
  local kused = tonumber(redis.call('HGET', keydaykey, key_id) or '0')
  local kroom = math.max(keycap - kused, 0)
  if room < 0 or kroom < room then room = kroom; tok_limit = keycap; bound = 'keycap' end
end

-- credits: output tokens the balance affords after the prompt (-1: unlimited, free output)
local balkey = 'dg:bal:' .. acct
local bal = tonumber(redis.call('GET', balkey) or '0')
local prompt_cost = prompt * pin
local afford
if bal < prompt_cost then afford = 0
elseif pout == 0 then afford = -1
else afford = idiv(bal - prompt_cost, pout) end
local day_reset = day_end - now

-- token headers before any reservation (refusals report these)
local tok_rem = room
if tok_limit < 0 then
  if pout > 0 then tok_limit = idiv(math.max(bal, 0), pout); tok_rem = tok_limit end
end

-- requests per minute: GCRA, burst = the limit, counted for every authenticated request
local T = 60000 / rpm
local rkey = 'dg:rpm:' .. acct
local tat = tonumber(redis.call('GET', rkey) or '0')
if tat < now then tat = now end
local allow_at = tat + T - rpm * T
if now < allow_at then
  return reply('rpm', acct, key_id, 0, rpm, 0, tat - now, tok_limit, tok_rem, day_reset,
          allow_at - now, bal, room)
end
local new_tat = tat + T
redis.call('SET', rkey, string.format('%.3f', new_tat), 'PX', s(math.ceil(new_tat - now) + 1))
local rpm_rem = math.floor((now - allow_at) / T)
local rpm_reset = new_tat - now

if room >= 0 and room < prompt + copies then
  return reply(bound, acct, key_id, 0, rpm, rpm_rem, rpm_reset, tok_limit, tok_rem, day_reset,
          day_reset, bal, room)
end
if afford >= 0 and afford < copies then
  return reply('credits', acct, key_id, 0, rpm, rpm_rem, rpm_reset, tok_limit, tok_rem, day_reset,
          0, bal, room)
end

local mt = want
if room >= 0 and idiv(room - prompt, copies) < mt then mt = idiv(room - prompt, copies) end
if afford >= 0 and idiv(afford, copies) < mt then mt = idiv(afford, copies) end
local tokens = prompt + mt * copies
local cost = prompt_cost + mt * copies * pout

redis.call('DECRBY', balkey, s(cost))
redis.call('INCRBY', daykey, s(tokens))
redis.call('PEXPIREAT', daykey, s(day_end + DAY_GRACE_MS))
if tag ~= '' then
  redis.call('HINCRBY', tagdaykey, tag, s(tokens))
  redis.call('PEXPIREAT', tagdaykey, s(day_end + DAY_GRACE_MS))
end
redis.call('HINCRBY', keydaykey, key_id, s(tokens))  -- every key's: a cap set later counts it
redis.call('PEXPIREAT', keydaykey, s(day_end + DAY_GRACE_MS))
redis.call('HSET', KEYS[2], 'account', acct, 'key_id', key_id, 'day', day,
  'day_end', s(day_end), 'tag', tag, 'model', ARGV[10], 'pin', s(pin), 'pout', s(pout),
  'prompt', s(prompt), 'max', s(mt * copies), 'cost', s(cost), 'created', s(now))
redis.call('ZADD', KEYS[4], s(now + ttl), rid)
redis.call('SADD', 'dg:aholds:' .. acct, rid)

if room >= 0 then
  tok_rem = room - tokens
elseif pout > 0 then
  tok_rem = idiv(bal - cost, pout)
end
return reply('ok', acct, key_id, mt, rpm, rpm_rem, rpm_reset, tok_limit, tok_rem, day_reset, 0,
        bal - cost, room)
"""
)

# The Lua value of each usage event field inside `settle_one` (stream values are strings).
_EVENT_VALUES = {
    "request_id": "rid",
    "account_id": "acct",
    "key_id": "key_id",
    "customer_tag": "tag",
    "model": "model",
    "provider_id": "provider",
    "prompt_tokens": "s(p)",
    "completion_tokens": "s(c)",
    "input_nusd_per_token": "s(pin)",
    "output_nusd_per_token": "s(pout)",
    "cost_nusd": "s(cost)",
    "provider_share_nusd": "s(pshare)",
    "platform_share_nusd": "s(fshare)",
    "outcome": "outcome",
    "usage_day": "day",
    "created_at_ms": "h[12]",
    "settled_at_ms": "s(now)",
    "reported_completion_tokens": "reported",
}
_EVENT_ARGS = ",\n    ".join(f"'{name}', {_EVENT_VALUES[name]}" for name in FIELDS)
XADD_USAGE_EVENT = f"redis.call('XADD', 'dg:usage', '*',\n    {_EVENT_ARGS})"

SETTLE_FN = r"""
local function settle_one(rid, prompt, completion, provider, now, outcome, done_ttl, bpin, bpout,
                          reported)
  reported = reported or ''  -- the engine's own completion count ('' not known)
  local hk = 'dg:hold:' .. rid
  local h = redis.call('HMGET', hk, 'account', 'key_id', 'day', 'day_end', 'tag', 'model',
                       'pin', 'pout', 'prompt', 'max', 'cost', 'created')
  if not h[1] then return 0 end
  local acct, key_id, day, day_end, tag, model = h[1], h[2], h[3], tonumber(h[4]), h[5], h[6]
  local pin, pout = tonumber(h[7]), tonumber(h[8])
  -- the serving provider's prices, never above the reserved ones (nil: the reserved ones)
  if bpin and bpin >= 0 and bpin < pin then pin = bpin end
  if bpout and bpout >= 0 and bpout < pout then pout = bpout end
  local rp, rm, rcost = tonumber(h[9]), tonumber(h[10]), tonumber(h[11])
  -- bill what the engine reported. Above the reservation (a bug in the reservation, never
  -- clipped silently): billed as far as the balance allows, never below zero; the rest is
  -- counted in dg:overruns and returned to the caller, who logs it with the request id.
  local p, c = math.max(prompt, 0), math.max(completion, 0)
  local over = math.max(p - rp, 0) + math.max(c - rm, 0)
  local cost = p * pin + c * pout
  local unbilled = 0
  if cost > rcost then
    local budget = rcost + math.max(tonumber(redis.call('GET', 'dg:bal:' .. acct) or '0'), 0)
    if cost > budget then
      local bp, bc = p, c
      if pin > 0 and p * pin > budget then bp = idiv(budget, pin) end
      if pout > 0 and bp * pin + c * pout > budget then bc = idiv(budget - bp * pin, pout) end
      unbilled = (p - bp) + (c - bc)
      p, c = bp, bc
      cost = p * pin + c * pout
    end
  end
  if over > 0 then
    redis.call('HINCRBY', 'dg:overruns', 'requests', '1')
    redis.call('HINCRBY', 'dg:overruns', 'tokens', s(over))
    redis.call('HINCRBY', 'dg:overruns', 'unbilled_tokens', s(unbilled))
  end
  -- the provider's share of cost, rounded down, without forming cost * share (exact below 2^53)
  local share = $PROVIDER_SHARE_PCT
  local pshare = idiv(cost, 100) * share + idiv(math.fmod(cost, 100) * share, 100)
  local fshare = cost - pshare
  redis.call('INCRBY', 'dg:bal:' .. acct, s(rcost - cost))
  local unused = (rp + rm) - (p + c)
  if unused ~= 0 then  -- negative: an overrun, counted against the caps too
    local dk = 'dg:day:' .. acct .. ':' .. day
    redis.call('DECRBY', dk, s(unused))
    redis.call('PEXPIREAT', dk, s(day_end + DAY_GRACE_MS))
    if tag ~= '' then
      local tk = 'dg:tagday:' .. acct .. ':' .. day
      redis.call('HINCRBY', tk, tag, s(-unused))
      redis.call('PEXPIREAT', tk, s(day_end + DAY_GRACE_MS))
    end
    local kk = 'dg:keyday:' .. acct .. ':' .. day
    redis.call('HINCRBY', kk, key_id, s(-unused))
    redis.call('PEXPIREAT', kk, s(day_end + DAY_GRACE_MS))
  end
  redis.call('DEL', hk)
  redis.call('ZREM', 'dg:holds', rid)
  redis.call('SREM', 'dg:aholds:' .. acct, rid)
  redis.call('SET', 'dg:done:' .. rid, '1', 'PX', done_ttl)
  redis.call('INCR', 'dg:settles:' .. acct)
  redis.call('INCR', 'dg:undrained:' .. acct)
  $XADD_USAGE_EVENT
  return 1, over, unbilled
end
""".replace("$PROVIDER_SHARE_PCT", str(PROVIDER_SHARE_PCT)).replace(
    "$XADD_USAGE_EVENT", XADD_USAGE_EVENT
)

# ARGV: 1 request id, 2 prompt tokens, 3 completion tokens, 4 provider, 5 now_ms, 6 done ttl,
#       [7 input price, 8 output price: what the serving provider bills per token, each capped
#       at the reserved price; absent or '': the reserved prices, 9 the completion tokens the
#       engine reported (3 is the ingress's own count, never above it); absent or '': unknown]
# Reply: 0 (no open hold), 1 (settled), or {1, tokens over the reservation, of them unbilled}
# where the engine reported more than was reserved.
SETTLE = (
    COMMON
    + SETTLE_FN
    + r"""
local ok, over, unbilled = settle_one(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4],
  tonumber(ARGV[5]), 'settled', ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9])
if ok == 1 and over > 0 then return {1, over, unbilled} end
return ok
"""
)

# ARGV: 1 now_ms, 2 max holds, 3 done ttl. Settles each expired hold at its last checkpoint:
# the usage its stream had delivered when its ingress last wrote one, at the serving
# provider's prices, through the same `settle_one` as `SETTLE` (the ledger, the caps and the
# provider's earnings see it once). A hold with no checkpoint settles as zero usage: nothing
# was delivered that billing knows of (a request still waiting for its first token, or one
# that is not a stream, whose answer never left the ingress that died).
REAP = (
    COMMON
    + SETTLE_FN
    + r"""
local now = tonumber(ARGV[1])
local rids = redis.call('ZRANGEBYSCORE', 'dg:holds', '-inf', s(now), 'LIMIT', 0, ARGV[2])
local n = 0
for _, rid in ipairs(rids) do
  local cp = redis.call('HMGET', 'dg:hold:' .. rid, 'cp_prompt', 'cp_completion', 'cp_provider',
                        'cp_pin', 'cp_pout', 'cp_reported')
  if settle_one(rid, tonumber(cp[1]) or 0, tonumber(cp[2]) or 0, cp[3] or '', now, 'reaped',
                ARGV[3], tonumber(cp[4]), tonumber(cp[5]), cp[6]) == 1 then n = n + 1
  else redis.call('ZREM', 'dg:holds', rid) end
end
return n
"""
)

# ARGV: 1 new expiry ms, then request ids. Keeps live requests' reservations from being
# reaped (an ingress extends every hold it has in flight). Reply: how many were open.
EXTEND = r"""
local n = 0
for i = 2, #ARGV do
  if redis.call('EXISTS', 'dg:hold:' .. ARGV[i]) == 1 then
    redis.call('ZADD', 'dg:holds', 'XX', 'GT', ARGV[1], ARGV[i])
    n = n + 1
  end
end
return n
"""

# A stream's usage delivered so far, kept in its hold for the reaper, and its expiry pushed.
# ARGV: 1 request id, 2 prompt tokens, 3 completion tokens, 4 provider, 5 input price,
#       6 output price ('' each: the reserved prices), 7 now_ms, 8 new expiry ms,
#       [9 the completion tokens the engine reported so far (3: the ingress's count)]
# A checkpoint never goes back: one below the last (a late write) changes only the expiry.
# Reply: 0 (no open hold: settled or reaped already, nothing written), 1.
CHECKPOINT = r"""
local hk = 'dg:hold:' .. ARGV[1]
if redis.call('EXISTS', hk) == 0 then return 0 end
local p, c = tonumber(ARGV[2]), tonumber(ARGV[3])
local last = redis.call('HMGET', hk, 'cp_prompt', 'cp_completion')
if not last[1] or (p >= tonumber(last[1]) and c >= tonumber(last[2])) then
  redis.call('HSET', hk, 'cp_prompt', ARGV[2], 'cp_completion', ARGV[3], 'cp_provider', ARGV[4],
             'cp_pin', ARGV[5], 'cp_pout', ARGV[6], 'cp_at', ARGV[7], 'cp_reported', ARGV[9] or '')
end
redis.call('ZADD', 'dg:holds', 'XX', 'GT', ARGV[8], ARGV[1])
return 1
"""

# Acknowledge recorded usage entries and forget them. ARGV: group, then (entry id, account)
# pairs. Only an entry that was still pending counts down its account's undrained counter,
# so a replayed acknowledgement changes nothing.
ACK = r"""
local n = 0
for i = 2, #ARGV, 2 do
  if redis.call('XACK', 'dg:usage', ARGV[1], ARGV[i]) == 1 then
    redis.call('XDEL', 'dg:usage', ARGV[i])
    if redis.call('DECR', 'dg:undrained:' .. ARGV[i + 1]) <= 0 then
      redis.call('DEL', 'dg:undrained:' .. ARGV[i + 1])
    end
    n = n + 1
  end
end
return n
"""

# Rebuild one account's balance and today's usage from SQL, atomically, if no settlement of
# the account happened since the SQL snapshot was taken. Open holds are subtracted again.
# ARGV: 1 account, 2 settle counter seen before the snapshot, 3 SQL balance, 4 day YYYYMMDD,
#       5 day_end_ms, 6 SQL tokens today, 7 json {tag: SQL tokens today},
#       8 json {key id: SQL tokens today}
# Reply: 1 written, 0 the account settled meanwhile (take a new snapshot).
REBUILD_ACCOUNT = (
    COMMON
    + r"""
local acct, day, day_end = ARGV[1], ARGV[4], tonumber(ARGV[5])
if tonumber(redis.call('GET', 'dg:settles:' .. acct) or '0') ~= tonumber(ARGV[2]) then
  return 0
end
if tonumber(redis.call('GET', 'dg:undrained:' .. acct) or '0') > 0 then return 0 end
local bal, used = tonumber(ARGV[3]), tonumber(ARGV[6])
local tags = cjson.decode(ARGV[7])
local keys = cjson.decode(ARGV[8])
for _, rid in ipairs(redis.call('SMEMBERS', 'dg:aholds:' .. acct)) do
  local h = redis.call('HMGET', 'dg:hold:' .. rid, 'cost', 'prompt', 'max', 'day', 'tag',
                       'key_id')
  if h[1] then
    bal = bal - tonumber(h[1])
    if h[4] == day then
      local toks = tonumber(h[2]) + tonumber(h[3])
      used = used + toks
      if h[5] ~= '' then tags[h[5]] = (tags[h[5]] or 0) + toks end
      keys[h[6]] = (keys[h[6]] or 0) + toks
    end
  else
    redis.call('SREM', 'dg:aholds:' .. acct, rid)
  end
end
redis.call('SET', 'dg:bal:' .. acct, s(bal))
local dk = 'dg:day:' .. acct .. ':' .. day
redis.call('SET', dk, s(used), 'PXAT', s(day_end + DAY_GRACE_MS))
local tk = 'dg:tagday:' .. acct .. ':' .. day
redis.call('DEL', tk)
for tag, n in pairs(tags) do redis.call('HSET', tk, tag, s(n)) end
if next(tags) ~= nil then redis.call('PEXPIREAT', tk, s(day_end + DAY_GRACE_MS)) end
local kk = 'dg:keyday:' .. acct .. ':' .. day
redis.call('DEL', kk)
for key_id, n in pairs(keys) do redis.call('HSET', kk, key_id, s(n)) end
if next(keys) ~= nil then redis.call('PEXPIREAT', kk, s(day_end + DAY_GRACE_MS)) end
return 1
"""
)
