"""Redis Lua scripts for admission, settlement, reaping and rebuild (names in billing.redis_keys).

Lua 5.1 numbers are doubles: every integer below 2**53 is exact, and money stays below that
(billing.money.MAX_BALANCE_NUSD). Numbers are turned into strings with `string.format('%d')`
only, never `tostring` or `..` (those keep 14 digits). Division goes through `idiv`, exact for
non-negative integers.
"""

from __future__ import annotations

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
#       7 input price, 8 output price, 9 hold ttl ms, 10 model, 11 plans json, 12 request id
# Reply: {outcome, account, key_id, granted, rpm_limit, rpm_remaining, rpm_reset_ms,
#         tok_limit, tok_remaining, tok_reset_ms, retry_after_ms, balance, room}
ADMIT = (
    COMMON
    + r"""
local now, day, day_end, tag = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), ARGV[4]
local prompt, want = tonumber(ARGV[5]), tonumber(ARGV[6])
local pin, pout, ttl, rid = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), ARGV[12]

if redis.call('EXISTS', KEYS[5]) == 0 then return {'cold'} end
local k = redis.call('HMGET', KEYS[1], 'account', 'key_id')
local acct, key_id = k[1], k[2]
if not acct then return {'nokey'} end
local a = redis.call('HMGET', 'dg:acct:' .. acct, 'plan', 'status', 'rpm', 'tpd')
local plan = a[1] and cjson.decode(ARGV[11])[a[1]]
if not plan or a[2] ~= 'active' then return {'disabled', acct, key_id} end
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('EXISTS', KEYS[3]) == 1 then
  return {'dup', acct, key_id}
end
local rpm = tonumber(a[3]) or plan[1]
local tpd = tonumber(a[4]) or plan[2]

-- daily token room (-1: no cap), the tighter of the account's cap and the tag's cap
local daykey = 'dg:day:' .. acct .. ':' .. day
local tagdaykey = 'dg:tagday:' .. acct .. ':' .. day
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
  return {'rpm', acct, key_id, 0, rpm, 0, tat - now, tok_limit, tok_rem, day_reset,
          allow_at - now, bal, room}
end
local new_tat = tat + T
redis.call('SET', rkey, string.format('%.3f', new_tat), 'PX', s(math.ceil(new_tat - now) + 1))
local rpm_rem = math.floor((now - allow_at) / T)
local rpm_reset = new_tat - now

if room >= 0 and room < prompt + 1 then
  return {bound, acct, key_id, 0, rpm, rpm_rem, rpm_reset, tok_limit, tok_rem, day_reset,
          day_reset, bal, room}
end
if afford == 0 then
  return {'credits', acct, key_id, 0, rpm, rpm_rem, rpm_reset, tok_limit, tok_rem, day_reset,
          0, bal, room}
end

local mt = want
if room >= 0 and room - prompt < mt then mt = room - prompt end
if afford >= 0 and afford < mt then mt = afford end
local tokens = prompt + mt
local cost = prompt_cost + mt * pout

redis.call('DECRBY', balkey, s(cost))
redis.call('INCRBY', daykey, s(tokens))
redis.call('PEXPIREAT', daykey, s(day_end + DAY_GRACE_MS))
if tag ~= '' then
  redis.call('HINCRBY', tagdaykey, tag, s(tokens))
  redis.call('PEXPIREAT', tagdaykey, s(day_end + DAY_GRACE_MS))
end
redis.call('HSET', KEYS[2], 'account', acct, 'key_id', key_id, 'day', day,
  'day_end', s(day_end), 'tag', tag, 'model', ARGV[10], 'pin', s(pin), 'pout', s(pout),
  'prompt', s(prompt), 'max', s(mt), 'cost', s(cost), 'created', s(now))
redis.call('ZADD', KEYS[4], s(now + ttl), rid)
redis.call('SADD', 'dg:aholds:' .. acct, rid)

if room >= 0 then
  tok_rem = room - tokens
elseif pout > 0 then
  tok_rem = idiv(bal - cost, pout)
end
return {'ok', acct, key_id, mt, rpm, rpm_rem, rpm_reset, tok_limit, tok_rem, day_reset, 0,
        bal - cost, room}
"""
)

SETTLE_FN = r"""
local function settle_one(rid, prompt, completion, provider, now, outcome, done_ttl, bpin, bpout)
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
  -- bill what the engine reported, never more than what was reserved
  local p = math.min(math.max(prompt, 0), rp)
  local c = math.min(math.max(completion, 0), rm)
  local cost = p * pin + c * pout
  -- 95% of cost, rounded down, without forming cost * 95 (exact below 2^53)
  local pshare = idiv(cost, 100) * 95 + idiv(math.fmod(cost, 100) * 95, 100)
  local fshare = cost - pshare
  redis.call('INCRBY', 'dg:bal:' .. acct, s(rcost - cost))
  local unused = (rp + rm) - (p + c)
  if unused > 0 then
    local dk = 'dg:day:' .. acct .. ':' .. day
    redis.call('DECRBY', dk, s(unused))
    redis.call('PEXPIREAT', dk, s(day_end + DAY_GRACE_MS))
    if tag ~= '' then
      local tk = 'dg:tagday:' .. acct .. ':' .. day
      redis.call('HINCRBY', tk, tag, s(-unused))
      redis.call('PEXPIREAT', tk, s(day_end + DAY_GRACE_MS))
    end
  end
  redis.call('DEL', hk)
  redis.call('ZREM', 'dg:holds', rid)
  redis.call('SREM', 'dg:aholds:' .. acct, rid)
  redis.call('SET', 'dg:done:' .. rid, '1', 'PX', done_ttl)
  redis.call('INCR', 'dg:settles:' .. acct)
  redis.call('INCR', 'dg:undrained:' .. acct)
  redis.call('XADD', 'dg:usage', '*', 'request_id', rid, 'account_id', acct,
    'key_id', key_id, 'customer_tag', tag, 'model', model, 'provider_id', provider,
    'prompt_tokens', s(p), 'completion_tokens', s(c),
    'input_nusd_per_token', s(pin), 'output_nusd_per_token', s(pout),
    'cost_nusd', s(cost), 'provider_share_nusd', s(pshare), 'platform_share_nusd', s(fshare),
    'outcome', outcome, 'usage_day', day, 'created_at_ms', h[12], 'settled_at_ms', s(now))
  return 1
end
"""

# ARGV: 1 request id, 2 prompt tokens, 3 completion tokens, 4 provider, 5 now_ms, 6 done ttl,
#       [7 input price, 8 output price: what the serving provider bills per token, each capped
#       at the reserved price; absent: the reserved prices]
SETTLE = (
    COMMON
    + SETTLE_FN
    + r"""
return settle_one(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5]),
                  'settled', ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8]))
"""
)

# ARGV: 1 now_ms, 2 max holds, 3 done ttl. Settles expired holds as zero usage.
REAP = (
    COMMON
    + SETTLE_FN
    + r"""
local now = tonumber(ARGV[1])
local rids = redis.call('ZRANGEBYSCORE', 'dg:holds', '-inf', s(now), 'LIMIT', 0, ARGV[2])
local n = 0
for _, rid in ipairs(rids) do
  if settle_one(rid, 0, 0, '', now, 'reaped', ARGV[3]) == 1 then n = n + 1
  else redis.call('ZREM', 'dg:holds', rid) end
end
return n
"""
)

# ARGV: 1 request id, 2 new expiry ms. Keeps a long stream's reservation from being reaped.
EXTEND = r"""
if redis.call('EXISTS', 'dg:hold:' .. ARGV[1]) == 0 then return 0 end
redis.call('ZADD', 'dg:holds', 'XX', 'GT', ARGV[2], ARGV[1])
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
#       5 day_end_ms, 6 SQL tokens today, 7 json {tag: SQL tokens today}
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
for _, rid in ipairs(redis.call('SMEMBERS', 'dg:aholds:' .. acct)) do
  local h = redis.call('HMGET', 'dg:hold:' .. rid, 'cost', 'prompt', 'max', 'day', 'tag')
  if h[1] then
    bal = bal - tonumber(h[1])
    if h[4] == day then
      local toks = tonumber(h[2]) + tonumber(h[3])
      used = used + toks
      if h[5] ~= '' then tags[h[5]] = (tags[h[5]] or 0) + toks end
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
return 1
"""
)
