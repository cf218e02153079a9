"""The Lua scripts behind every shared change in Redis: buckets, leases, balances, credits.

Pure data: text and the argument layout of ADMIT, no redis import. Each script reads Redis's own
clock (TIME), so instances never race on time; money is kept exact in two-part integers because
Lua numbers are doubles.
"""

from __future__ import annotations

from typing import Any

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


def _release(r: str, t: str, c: str, back_r: str, back_t: str, lease: str) -> str:
    """Free the concurrency lease `lease` of zset `c`, give `back_r` requests and `back_t` tokens
    to buckets `r` and `t` (after _BUCKET)."""
    return (
        f"if {lease} ~= '' then redis.call('ZREM', {c}, {lease}) end "
        + f"local ar, at = tonumber({back_r}), tonumber({back_t}) "
        + "local function give(k, add, rate, cap) "
        + "  store(k, math.min(cap, level(k, rate, cap) + add * U), rate, cap) end "
        + f"if rr > 0 and ar ~= 0 then give({r}, ar, rr, rc) end "
        + f"if tr > 0 and at ~= 0 then give({t}, at, tr, tc) end "
    )


RELEASE = (  # ARGV 5 requests back, 6 tokens back (negative: charge more), 7 lease or ''
    _BUCKET
    + _release("KEYS[1]", "KEYS[2]", "KEYS[3]", "ARGV[5]", "ARGV[6]", "ARGV[7]")
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
    + "local function add(ah, al, bh, bl) local h, l = ah + bh, al + bl "
    + "  if l >= B then l = l - B h = h + 1 end return h, l end "
    + "local function S(h, l) if h == 0 then return string.format('%d', l) end "
    + "  return string.format('%d%09d', h, l) end "
    + "local function unreserve(m) local a = redis.call('HGET', KEYS[2], m) "
    + "  if a then redis.call('HDEL', KEYS[2], m) "
    + "    if a ~= '0' then redis.call('HINCRBY', KEYS[1], 'res', '-' .. a) end end "
    + "  redis.call('ZREM', KEYS[3], m) end "
)
# A balance Redis does not hold (a restart that came back empty, an eviction) is never read as
# zero: ADMIT, SETTLE and CREDIT answer MISSING (-1) and change nothing, and the ledger puts the
# balance back with SEED_MISSING before it asks again.
MISSING = -1


def _settle(lease: str, cost: str) -> str:
    """Release the balance lease `lease` and charge `cost` (the ledger's rules); the answer.

    One read and one write of the balance hash: the lease's amount comes off `res`, the charge
    (the cost, at most what is free) off `bal`, in exact pairs, and the change counter `n` goes
    up by one. A release that would take `res` below zero (a lease Redis kept while it forgot
    the balance) leaves it at zero."""
    return (
        "local v = redis.call('HMGET', KEYS[1], 'bal', 'res', 'ver', 'n') "
        + "if not v[1] then return {'-1', '0', '0', '-1', 0} end "
        + "local bh, bl = P(v[1]) local rh, rl = P(v[2]) "
        + f"if {lease} ~= '' then local a = redis.call('HGET', KEYS[2], {lease}) "
        + f"  if a then redis.call('HDEL', KEYS[2], {lease}) local xh, xl = P(a) "
        + "    if lt(rh, rl, xh, xl) then rh, rl = 0, 0 else rh, rl = sub(rh, rl, xh, xl) end end "
        + f"  redis.call('ZREM', KEYS[3], {lease}) end "
        + "local charge = '0' "
        + "if lt(rh, rl, bh, bl) then local fh, fl = sub(bh, bl, rh, rl) "
        + f"  local ch, cl = P({cost}) if lt(fh, fl, ch, cl) then ch, cl = fh, fl end "
        + "  charge = S(ch, cl) bh, bl = sub(bh, bl, ch, cl) end "
        + "local n = (tonumber(v[4]) or 0) + 1 local bal, res = S(bh, bl), S(rh, rl) "
        + "redis.call('HSET', KEYS[1], 'bal', bal, 'res', res, 'n', n) "
        + "return {charge, bal, res, v[3] or '-1', n}"
    )


SETTLE = (  # ARGV lease ('' for a request admitted locally), cost
    # returns {charge, balance, reserved, version, n} after it, or {-1, ...} (MISSING)
    _PAIRS + _settle("ARGV[1]", "ARGV[2]")
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

# Spend windows: one hash per window and period. Fields: s spent, r reserved, t the 5-hour
# window's start. Adds are HINCRBY (exact 64-bit); comparisons are Lua doubles, exact because
# limits stay below 2**53.


def _spend_settle(first: int, amount: str, cost: str, starts: int) -> str:
    """Swap the reservation `amount` for `cost` in the windows KEYS[first..]; the window at
    KEYS[first + j] takes ARGV[starts + j] as its 5-hour start ('0': a calendar window)."""
    return (
        f"for i = {first}, #KEYS do local t = ARGV[{starts - first} + i] "
        + "  local w = redis.call('HMGET', KEYS[i], 's', 'r', 't') "
        + "  if w[1] and (t == '0' or w[3] == t) then "
        + f"    local r = (tonumber(w[2]) or 0) - tonumber({amount}) if r < 0 then r = 0 end "
        + "    redis.call('HSET', KEYS[i], 'r', r) "
        + f"    redis.call('HINCRBY', KEYS[i], 's', {cost}) end end "
    )


SPEND_SETTLE = (  # ARGV 1 amount reserved, 2 cost, then per window the 5h start ('0': calendar)
    _spend_settle(1, "ARGV[1]", "ARGV[2]", 3) + "return 1"
)
SPEND_VIEW = (  # per window {spent or -1, 5h start or 0}
    "local out = {} "
    "for i = 1, #KEYS do local v = redis.call('HMGET', KEYS[i], 's', 't') "
    "  out[#out + 1] = tonumber(v[1]) or -1 out[#out + 1] = tonumber(v[2]) or 0 end "
    "return out"
)

# Admission: a request's limits, spend windows and balance reservation in one script, one round
# trip. Everything is checked first, in the refusal order of proxyd.admission.admit (requests and
# tokens, concurrency, each spend window, balance), and only then applied: a refusal changes
# nothing but housekeeping (expired leases swept, the balance's change counter). Every key of a
# call carries the account's hash tag, so a call's keys share one Redis Cluster slot.
#
# KEYS 1 balance hash, 2 its lease amounts, 3 its lease expiries (`acct:{<account>}:b|l|e`);
#      4, 5, 6 the key's request bucket, token bucket, lease zset (`lim:{<account>}:<key>:r|t|c`);
#      7.. the key's spend windows (`spend:{<account>}:<key>:<window>[:<period>]`).
# ARGV 1-4 request rate and cap, token rate and cap (0: no bucket), 5 tokens, 6 max concurrency
#      (0: none), 7 concurrency lease ('' for none), 8 lease ttl ms, 9 amount to reserve on the
#      balance ('': the call has no balance part), 10 balance lease, 11 spend amount, 12 now (unix
#      seconds, the spend windows' clock), then four per spend window: limit, kind ('5h' or
#      'cal'), aux (5h: the mirror's window start, 0 for none; cal: ttl seconds), seed (the
#      mirror's spent, put back where Redis holds no window).
# A part the caller does not use is off by its arguments (rates and concurrency 0, amount '',
# no window keys); its keys are then never touched (any key of the same slot stands in).
# Returns {status, wait requests, wait tokens, request level, token level, in flight, balance,
# reserved, balance version, balance change counter, window, ...}: status 0 admitted, then per
# window its start and spent; 1 rate limited; 2 concurrency; 3 spend window `window` (1-based)
# full, then its start and spent; 4 balance too low; MISSING no balance in Redis. Levels and
# counts are as after the call; the balance fields are those seen ('0', '0', '-1', 0 unused).
ADMIT_ARGS = 12  # ARGV before the spend windows' four each
ADMIT_KEYS = 6  # KEYS before the spend windows
ADMIT = (
    _BUCKET
    + _PAIRS
    + "local tokens, mc = tonumber(ARGV[5]), tonumber(ARGV[6]) "
    + "local lvr, lvt, wr, wt, n = 0, 0, 0, 0, 0 "
    + "if rr > 0 then lvr = level(KEYS[4], rr, rc) "
    + "  if lvr < U then wr = math.ceil((U - lvr) / rr) end end "
    + "if tr > 0 then lvt = level(KEYS[5], tr, tc) local need = math.min(tokens * U, tc) "
    + "  if lvt < need then wt = math.ceil((need - lvt) / tr) end end "
    + "if mc > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now) "
    + "  n = redis.call('ZCARD', KEYS[6]) end "
    + "local out = {0, wr, wt, lvr, lvt, n, '0', '0', '-1', 0, 0} "
    + "if wr > 0 or wt > 0 then out[1] = 1 return out end "
    + "if mc > 0 and n >= mc then out[1] = 2 return out end "
    # spend windows: check each (seeding or opening only in the plan `fresh`)
    + "local amt, snow = tonumber(ARGV[11]), tonumber(ARGV[12]) local st, fresh = {}, {} "
    + "for i = 7, #KEYS do local b = 13 + (i - 7) * 4 local lim = tonumber(ARGV[b]) "
    + "  local five = ARGV[b + 1] == '5h' "
    + "  local v = redis.call('HMGET', KEYS[i], 's', 'r', 't') "
    + "  local spent, res, start = tonumber(v[1]), tonumber(v[2]) or 0, tonumber(v[3]) or 0 "
    + "  if spent == nil then res = 0 "
    + "    if five then local ss = tonumber(ARGV[b + 2]) "
    + "      if ss > 0 and snow < ss + 18000 then spent = tonumber(ARGV[b + 3]) start = ss "
    + "        fresh[i] = 'seed5h' end "
    + "    else spent = tonumber(ARGV[b + 3]) fresh[i] = 'seed' end end "
    + "  if five and (spent == nil or snow >= start + 18000) then "
    + "    spent = 0 res = 0 start = snow fresh[i] = 'open' end "
    + "  if spent + res + amt > lim then "
    + "    out[1] = 3 out[11] = i - 6 out[12] = start out[13] = spent return out end "
    + "  st[i] = {start, spent} end "
    # balance: never read a missing one as zero; sweep expired reservations, then check
    + "local ledger = ARGV[9] ~= '' local bn, ah, al, rh, rl = 0, 0, 0, 0, 0 "
    + "if ledger then "
    + "  local v = redis.call('HMGET', KEYS[1], 'bal', 'res', 'ver', 'n') "
    + "  if not v[1] then out[1] = -1 return out end "
    + "  local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now) "
    + "  if #gone > 0 then for _, m in ipairs(gone) do unreserve(m) end "
    + "    v = redis.call('HMGET', KEYS[1], 'bal', 'res', 'ver', 'n') end "
    + "  local bal, res = v[1], v[2] or '0' bn = (tonumber(v[4]) or 0) + 1 "
    + "  out[7] = bal out[8] = res out[9] = v[3] or '-1' out[10] = bn "
    + "  local bh, bl = P(bal) rh, rl = P(res) ah, al = P(ARGV[9]) "
    + "  local fh, fl = 0, 0 "
    + "  if lt(rh, rl, bh, bl) then fh, fl = sub(bh, bl, rh, rl) end "
    + "  if not lt(rh, rl, bh, bl) or lt(fh, fl, ah, al) then "
    + "    redis.call('HSET', KEYS[1], 'n', bn) out[1] = 4 return out end end "
    # everything holds: apply everything
    + "if rr > 0 then lvr = lvr - U store(KEYS[4], lvr, rr, rc) end "
    + "if tr > 0 then lvt = lvt - tokens * U store(KEYS[5], lvt, tr, tc) end "
    + "if mc > 0 then redis.call('ZADD', KEYS[6], now + tonumber(ARGV[8]), ARGV[7]) "
    + "  redis.call('PEXPIRE', KEYS[6], tonumber(ARGV[8]) + 1000) n = n + 1 end "
    + "out[4] = lvr out[5] = lvt out[6] = n "
    + "for i = 7, #KEYS do local b = 13 + (i - 7) * 4 local f = fresh[i] "
    + "  if f == 'open' then redis.call('DEL', KEYS[i]) "
    + "    redis.call('HSET', KEYS[i], 's', 0, 'r', 0, 't', ARGV[12]) "
    + "    redis.call('EXPIRE', KEYS[i], 18060) "
    + "  elseif f == 'seed5h' then "
    + "    redis.call('HSET', KEYS[i], 's', ARGV[b + 3], 'r', 0, 't', ARGV[b + 2]) "
    + "    redis.call('EXPIRE', KEYS[i], st[i][1] + 18060 - snow) "
    + "  elseif f == 'seed' then redis.call('HSET', KEYS[i], 's', ARGV[b + 3], 'r', 0) "
    + "    redis.call('EXPIRE', KEYS[i], tonumber(ARGV[b + 2])) end "
    + "  redis.call('HINCRBY', KEYS[i], 'r', ARGV[11]) "
    + "  out[#out + 1] = st[i][1] out[#out + 1] = st[i][2] end "
    + "if ledger then local h, l = add(rh, rl, ah, al) out[8] = S(h, l) "
    + "  redis.call('HSET', KEYS[1], 'res', out[8], 'n', bn) "
    + "  redis.call('HSET', KEYS[2], ARGV[10], ARGV[9]) "
    + "  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[8]), ARGV[10]) end "
    + "return out"
)
ADMIT_UNDO = (  # KEYS and ARGV of an ADMIT call whose answer never came (the caller left):
    # gives back what it took, if it took anything (its balance lease is there); 1 if it did
    _BUCKET
    + _PAIRS
    + "if ARGV[9] == '' or not redis.call('HGET', KEYS[2], ARGV[10]) then return 0 end "
    + "unreserve(ARGV[10]) "
    + _release("KEYS[4]", "KEYS[5]", "KEYS[6]", "1", "ARGV[5]", "ARGV[7]")
    + "for i = 7, #KEYS do if redis.call('EXISTS', KEYS[i]) == 1 and "
    + "  redis.call('HINCRBY', KEYS[i], 'r', -tonumber(ARGV[11])) < 0 then "
    + "  redis.call('HSET', KEYS[i], 'r', 0) end end "
    + "return 1"
)

FINISH = (  # KEYS as ADMIT; ARGV 1-4 rates as ADMIT, 5 requests back, 6 tokens back (negative:
    # charge more), 7 concurrency lease or '', 8 balance lease ('' for none), 9 cost, 10 the spend
    # amount reserved, then per spend window its 5-hour start ('0' for a calendar window).
    # RELEASE, SPEND_SETTLE and SETTLE of one request in one call; answers as SETTLE (MISSING
    # when Redis holds no balance: the limits and windows are done, the balance is not).
    _BUCKET
    + _PAIRS
    + _release("KEYS[4]", "KEYS[5]", "KEYS[6]", "ARGV[5]", "ARGV[6]", "ARGV[7]")
    + _spend_settle(7, "ARGV[10]", "ARGV[9]", 11)
    + _settle("ARGV[8]", "ARGV[9]")
)


def admit_args(
    rates: list[int],
    tokens: int,
    cap: int,
    lease: str,
    lease_ms: int,
    amount: int | None,
    balance_lease: str,
    spend_amount: int,
    now: int,
    windows: list[Any],
) -> list[Any]:
    """ARGV of an ADMIT call (see above); `amount` None leaves the balance out."""
    return [
        *rates,
        tokens,
        cap,
        lease,
        lease_ms,
        "" if amount is None else amount,
        balance_lease,
        spend_amount,
        now,
        *windows,
    ]


SCRIPTS = {
    "admit": ADMIT,
    "admit_undo": ADMIT_UNDO,
    "finish": FINISH,
    "spend_settle": SPEND_SETTLE,
    "spend_view": SPEND_VIEW,
    "release": RELEASE,
    "view": VIEW,
    "refresh": REFRESH,
    "settle": SETTLE,
    "set": SET,
    "credit": CREDIT,
    "seed_missing": SEED_MISSING,
    "keep_latest": KEEP_LATEST,
}
