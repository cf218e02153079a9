"""The Lua scripts behind every shared change in Redis: buckets, leases, balances, credits.

Pure data: text only, no redis import. Each script reads Redis's own clock (TIME), so instances
never race on time; money is kept exact in two-part integers because Lua numbers are doubles.
"""

from __future__ import annotations

UNIT = 60_000  # one token, in (milliseconds x tokens-per-minute): integer levels in Lua doubles
_NOW = "local _t = redis.call('TIME') local now = _t[1] * 1000 + math.floor(_t[2] / 1000) "
_BUCKET = (
    _NOW
    + "local U = 60000 "
    + "local function level(k, rate, cap) "
    + "  local v = redis.call('HMGET', k, 'l', 's') local l = tonumber(v[1]) "
    + "  if not l then return cap end "
    + "  local s = tonumber(v[2]) if now > s then l = math.min(cap, l + (now - s) * rate) end "
    + "  return l end "
    + "local function store(k, l, rate, cap) "
    + "  if l >= cap then redis.call('DEL', k) return end "
    + "  redis.call('HSET', k, 'l', l, 's', now) "
    + "  redis.call('PEXPIRE', k, math.ceil((cap - l) / rate) + 1000) end "
    + "local rr, rc = tonumber(ARGV[1]), tonumber(ARGV[2]) * U "
    + "local tr, tc = tonumber(ARGV[3]), tonumber(ARGV[4]) * U "
)
ACQUIRE = (  # ARGV 5 tokens, 6 max concurrency (0: none), 7 lease, 8 lease ttl ms
    _BUCKET
    + "local tokens = tonumber(ARGV[5]) local mc = tonumber(ARGV[6]) "
    + "local lr, lt, wr, wt, n = 0, 0, 0, 0, 0 "
    + "if rr > 0 then lr = level(KEYS[1], rr, rc) "
    + "  if lr < U then wr = math.ceil((U - lr) / rr) end end "
    + "if tr > 0 then lt = level(KEYS[2], tr, tc) local need = math.min(tokens * U, tc) "
    + "  if lt < need then wt = math.ceil((need - lt) / tr) end end "
    + "if mc > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now) "
    + "  n = redis.call('ZCARD', KEYS[3]) end "
    + "if wr > 0 or wt > 0 then return {1, wr, wt, lr, lt, n} end "
    + "if mc > 0 and n >= mc then return {2, 0, 0, lr, lt, n} end "
    + "if rr > 0 then lr = lr - U store(KEYS[1], lr, rr, rc) end "
    + "if tr > 0 then lt = lt - tokens * U store(KEYS[2], lt, tr, tc) end "
    + "if mc > 0 then redis.call('ZADD', KEYS[3], now + tonumber(ARGV[8]), ARGV[7]) "
    + "  redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[8]) + 1000) n = n + 1 end "
    + "return {0, 0, 0, lr, lt, n}"
)
RELEASE = (  # ARGV 5 requests back, 6 tokens back (negative: charge more), 7 lease or ''
    _BUCKET
    + "if ARGV[7] ~= '' then redis.call('ZREM', KEYS[3], ARGV[7]) end "
    + "local ar, at = tonumber(ARGV[5]), tonumber(ARGV[6]) "
    + "local function give(k, add, rate, cap) "
    + "  store(k, math.min(cap, level(k, rate, cap) + add * U), rate, cap) end "
    + "if rr > 0 and ar ~= 0 then give(KEYS[1], ar, rr, rc) end "
    + "if tr > 0 and at ~= 0 then give(KEYS[2], at, tr, tc) end "
    + "return 1"
)
VIEW = (
    _BUCKET
    + "local lr, lt = 0, 0 "
    + "if rr > 0 then lr = level(KEYS[1], rr, rc) end "
    + "if tr > 0 then lt = level(KEYS[2], tr, tc) end "
    + "return {lr, lt, redis.call('ZCOUNT', KEYS[3], now, '+inf')}"
)
REFRESH = (  # KEYS 1 lease zset; ARGV 1 ttl ms, 2 pexpire the zset too (0/1), 3.. leases
    _NOW
    + "local ttl = tonumber(ARGV[1]) "
    + "for i = 3, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[i]) end "
    + "if ARGV[2] == '1' then redis.call('PEXPIRE', KEYS[1], ttl + 1000) end return 1"
)
# Money: exact base-1e9 pairs, since Lua numbers are doubles and balances go up to 2^62 nanos.
_PAIRS = (
    "local B = 1000000000 "
    + "local function P(s) s = s or '0' local n = #s if n <= 9 then return 0, tonumber(s) end "
    + "  return tonumber(string.sub(s, 1, n - 9)), tonumber(string.sub(s, n - 8)) end "
    + "local function lt(ah, al, bh, bl) return ah < bh or (ah == bh and al < bl) end "
    + "local function sub(ah, al, bh, bl) local h, l = ah - bh, al - bl "
    + "  if l < 0 then l = l + B h = h - 1 end return h, l end "
    + "local function S(h, l) if h == 0 then return string.format('%d', l) end "
    + "  return string.format('%d%09d', h, l) end "
    + "local function unreserve(m) local a = redis.call('HGET', KEYS[2], m) "
    + "  if a then redis.call('HDEL', KEYS[2], m) "
    + "    if a ~= '0' then redis.call('HINCRBY', KEYS[1], 'res', '-' .. a) end end "
    + "  redis.call('ZREM', KEYS[3], m) end "
)
# A balance Redis does not hold (a restart that came back empty, an eviction) is never read as
# zero: RESERVE, SETTLE and CREDIT answer MISSING (-1) and change nothing, and the ledger puts the
# balance back with SEED_MISSING before it asks again.
MISSING = -1
RESERVE = (  # KEYS bal hash, lease amounts, lease expiries; ARGV amount, lease, ttl ms
    _NOW
    + _PAIRS
    + "local v = redis.call('HMGET', KEYS[1], 'bal', 'res', 'ver') "
    + "if not v[1] then return {-1, '0', '0', '-1', 0} end "
    + "for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do unreserve(m) end "
    + "v = redis.call('HMGET', KEYS[1], 'bal', 'res', 'ver') "
    + "local bal, res, ver = v[1] or '0', v[2] or '0', v[3] or '-1' "
    + "local bh, bl = P(bal) local rh, rl = P(res) local ah, al = P(ARGV[1]) "
    + "local n = redis.call('HINCRBY', KEYS[1], 'n', 1) "
    + "if not lt(rh, rl, bh, bl) then return {0, bal, res, ver, n} end "
    + "local fh, fl = sub(bh, bl, rh, rl) "
    + "if lt(fh, fl, ah, al) then return {0, bal, res, ver, n} end "
    + "redis.call('HINCRBY', KEYS[1], 'res', ARGV[1]) res = redis.call('HGET', KEYS[1], 'res') "
    + "redis.call('HSET', KEYS[2], ARGV[2], ARGV[1]) "
    + "redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[2]) "
    + "return {1, bal, res, ver, n}"
)
SETTLE = (  # ARGV lease ('' for a request admitted locally), cost
    # returns {charge, balance, reserved, version, n} after it, or {-1, ...} (MISSING)
    _PAIRS
    + "if redis.call('HEXISTS', KEYS[1], 'bal') == 0 then return {'-1', '0', '0', '-1', 0} end "
    + "if ARGV[1] ~= '' then unreserve(ARGV[1]) end "
    + "local function after(c) local n = redis.call('HINCRBY', KEYS[1], 'n', 1) "
    + "  local w = redis.call('HMGET', KEYS[1], 'bal', 'res', 'ver') "
    + "  return {c, w[1], w[2] or '0', w[3] or '-1', n} end "
    + "local v = redis.call('HMGET', KEYS[1], 'bal', 'res') "
    + "local bh, bl = P(v[1]) local rh, rl = P(v[2]) local ch, cl = P(ARGV[2]) "
    + "if not lt(rh, rl, bh, bl) then return after('0') end "
    + "local fh, fl = sub(bh, bl, rh, rl) "
    + "if lt(fh, fl, ch, cl) then ch, cl = fh, fl end "
    + "local charge = S(ch, cl) "
    + "if charge ~= '0' then redis.call('HINCRBY', KEYS[1], 'bal', '-' .. charge) end "
    + "return after(charge)"
)
SET = (  # KEYS bal hash; ARGV version, balance, strict (seed); returns {applied, ver, bal, res}
    "local v = redis.call('HMGET', KEYS[1], 'ver', 'res') "
    + "if v[1] and (tonumber(ARGV[1]) < tonumber(v[1]) "
    + "  or (ARGV[3] == '1' and tonumber(ARGV[1]) == tonumber(v[1]))) then "
    + "  return {0, v[1], redis.call('HGET', KEYS[1], 'bal') or '0', v[2] or '0'} end "
    + "redis.call('HSET', KEYS[1], 'bal', ARGV[2], 'ver', ARGV[1]) "
    + "return {1, ARGV[1], ARGV[2], v[2] or '0'}"
)
CREDIT = (  # KEYS bal hash, applied credit ids; ARGV credit id, amount
    "if redis.call('HEXISTS', KEYS[1], 'bal') == 0 then return {-1, '0', '0', '-1'} end "
    + "local applied = redis.call('SADD', KEYS[2], ARGV[1]) "
    + "if applied == 1 then redis.call('HINCRBY', KEYS[1], 'bal', ARGV[2]) end "
    + "local v = redis.call('HMGET', KEYS[1], 'bal', 'res', 'ver') "
    + "return {applied, v[1] or '0', v[2] or '0', v[3] or '-1'}"
)
SEED_MISSING = (  # KEYS bal hash; ARGV version, balance: only where Redis holds no balance
    "if redis.call('HEXISTS', KEYS[1], 'bal') == 1 then return 0 end "
    + "redis.call('HSET', KEYS[1], 'bal', ARGV[2], 'ver', ARGV[1]) return 1"
)
KEEP_LATEST = (  # KEYS 1 a kind's latest pushed state; ARGV 1 its version, 2 its body
    # versions go up to 2**62, past what a Lua double holds exactly: compare their digits
    "local function older(a, b) if #a ~= #b then return #a < #b end return a < b end "
    + "local v = redis.call('HGET', KEYS[1], 'v') "
    + "if v and older(ARGV[1], v) then return 0 end "
    + "redis.call('HSET', KEYS[1], 'v', ARGV[1], 'b', ARGV[2]) return 1"
)

# Spend windows. Per window KEYS[i]; ARGV 1 amount, 2 now (unix seconds, an integer string),
# then four per window: limit, kind ('5h' or 'cal'), aux (5h: the mirror's window start, 0 for
# none; cal: ttl seconds), seed (the mirror's spent, put back where Redis holds no window).
# Hash fields: s spent, r reserved, t the 5-hour window's start. Adds are HINCRBY (exact
# 64-bit); comparisons are Lua doubles, exact because limits stay below 2**53.
SPEND_RESERVE = (
    "local amt = tonumber(ARGV[1]) local now = tonumber(ARGV[2]) "
    "local st, fresh = {}, {} "
    "for i = 1, #KEYS do "
    "  local b = 2 + (i - 1) * 4 local lim = tonumber(ARGV[b + 1]) "
    "  local five = ARGV[b + 2] == '5h' "
    "  local v = redis.call('HMGET', KEYS[i], 's', 'r', 't') "
    "  local spent, res, start = tonumber(v[1]), tonumber(v[2]) or 0, tonumber(v[3]) or 0 "
    "  if spent == nil then res = 0 "
    "    if five then local ss = tonumber(ARGV[b + 3]) "
    "      if ss > 0 and now < ss + 18000 then spent = tonumber(ARGV[b + 4]) start = ss "
    "        fresh[i] = 'seed5h' end "
    "    else spent = tonumber(ARGV[b + 4]) fresh[i] = 'seed' end end "
    "  if five and (spent == nil or now >= start + 18000) then "
    "    spent = 0 res = 0 start = now fresh[i] = 'open' end "
    "  if spent + res + amt > lim then return {i, start, spent, res} end "
    "  st[i] = {start, spent} end "
    "local out = {0} "
    "for i = 1, #KEYS do "
    "  local b = 2 + (i - 1) * 4 local f = fresh[i] "
    "  if f == 'open' then redis.call('DEL', KEYS[i]) "
    "    redis.call('HSET', KEYS[i], 's', 0, 'r', 0, 't', ARGV[2]) "
    "    redis.call('EXPIRE', KEYS[i], 18060) "
    "  elseif f == 'seed5h' then "
    "    redis.call('HSET', KEYS[i], 's', ARGV[b + 4], 'r', 0, 't', ARGV[b + 3]) "
    "    redis.call('EXPIRE', KEYS[i], st[i][1] + 18060 - now) "
    "  elseif f == 'seed' then redis.call('HSET', KEYS[i], 's', ARGV[b + 4], 'r', 0) "
    "    redis.call('EXPIRE', KEYS[i], tonumber(ARGV[b + 3])) end "
    "  redis.call('HINCRBY', KEYS[i], 'r', ARGV[1]) "
    "  out[#out + 1] = st[i][1] out[#out + 1] = st[i][2] end "
    "return out"
)
SPEND_SETTLE = (  # ARGV 1 amount reserved, 2 cost, then per window the 5h start ('0': calendar)
    "for i = 1, #KEYS do local t = ARGV[2 + i] "
    "  if redis.call('EXISTS', KEYS[i]) == 1 and "
    "     (t == '0' or redis.call('HGET', KEYS[i], 't') == t) then "
    "    if redis.call('HINCRBY', KEYS[i], 'r', -tonumber(ARGV[1])) < 0 then "
    "      redis.call('HSET', KEYS[i], 'r', 0) end "
    "    redis.call('HINCRBY', KEYS[i], 's', ARGV[2]) end end "
    "return 1"
)
SPEND_VIEW = (  # per window {spent or -1, 5h start or 0}
    "local out = {} "
    "for i = 1, #KEYS do local v = redis.call('HMGET', KEYS[i], 's', 't') "
    "  out[#out + 1] = tonumber(v[1]) or -1 out[#out + 1] = tonumber(v[2]) or 0 end "
    "return out"
)

SCRIPTS = {
    "spend_reserve": SPEND_RESERVE,
    "spend_settle": SPEND_SETTLE,
    "spend_view": SPEND_VIEW,
    "acquire": ACQUIRE,
    "release": RELEASE,
    "view": VIEW,
    "refresh": REFRESH,
    "reserve": RESERVE,
    "settle": SETTLE,
    "set": SET,
    "credit": CREDIT,
    "seed_missing": SEED_MISSING,
    "keep_latest": KEEP_LATEST,
}
