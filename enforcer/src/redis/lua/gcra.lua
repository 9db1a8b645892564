-- Token buckets of rate limits with scope global (GCRA), taken from all or none, on the
-- server's clock (TIME) so that nodes with skewed clocks agree. Redis 7 replicates the
-- script's effects, not the script, so reading the clock here is allowed.
-- KEYS[i]: a bucket hash: t = server time (microseconds) of its last change, d = its debt
-- at t (how far it is from full) in microseconds x rate, r = the rate d is counted in.
-- A missing bucket is full; a bucket vanishes (PEXPIRE) once it would be full again.
-- ARGV: mode ('t' take, 'p' peek: change nothing, 'f' refund), n, then per bucket:
-- rate, period in microseconds, burst.
-- Returns {1} when allowed (or refunded); {0, i, wait_us} when bucket i refuses (of the
-- buckets that refuse, the one with the longest wait); {-1, i} when n is more than
-- bucket i's burst. Taking n costs n x period in debt, and is allowed while the debt
-- stays within burst x period: rate units per period, burst at once, exactly.
-- Lua numbers are doubles: every value here stays below 2^53, hence exact, when rate and
-- burst x period are at most 2^51 (the caller clamps them there).

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local mode, n = ARGV[1], tonumber(ARGV[2])

-- floor(a / b) for integers 0 <= a, 0 < b below 2^53: the quotient of two doubles may be
-- rounded up to the next integer, so it is corrected.
local function idiv(a, b)
  local q = math.floor(a / b)
  while q > 0 and q * b > a do q = q - 1 end
  while (q + 1) * b <= a do q = q + 1 end
  return q
end

local function cdiv(a, b)
  local q = idiv(a, b)
  if q * b < a then q = q + 1 end
  return q
end

-- The debt of bucket `key` now, counted in `rate`, at most `tolerance` when the limit
-- changed since (a bucket more than empty would wait longer than its whole period).
local function debt(key, rate, tolerance)
  local h = redis.call('HMGET', key, 't', 'd', 'r')
  if not h[1] then return 0 end
  local t, d, r = tonumber(h[1]), tonumber(h[2]), tonumber(h[3])
  if r ~= rate then
    -- Keep the instant the bucket is full again, as the node's buckets do.
    d = math.min(cdiv(d, r) * rate, tolerance)
  end
  local elapsed = now - t
  -- A clock behind the last change (a promoted replica) refills nothing.
  if elapsed <= 0 then return d end
  if elapsed >= cdiv(d, rate) then return 0 end
  return d - elapsed * rate
end

local debts = {}
local worst, worst_wait = 0, -1
for i = 1, #KEYS do
  local rate, period, burst = tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1]), tonumber(ARGV[3 * i + 2])
  local tolerance = burst * period
  local d = debt(KEYS[i], rate, tolerance)
  debts[i] = d
  if mode ~= 'f' then
    if n > burst then return {-1, i} end
    local after = d + n * period
    if after > tolerance then
      local wait = cdiv(after - tolerance, rate)
      if wait > worst_wait then worst, worst_wait = i, wait end
    end
  end
end
if worst > 0 then return {0, worst, worst_wait} end
if mode == 'p' then return {1} end

for i = 1, #KEYS do
  local rate, period = tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1])
  local d = debts[i]
  if mode == 'f' then
    -- Never fuller than full: a refund does not bank capacity.
    d = math.max(0, d - n * period)
  else
    d = d + n * period
  end
  if d == 0 then
    redis.call('DEL', KEYS[i])
  else
    redis.call('HSET', KEYS[i], 't', string.format('%d', now), 'd', string.format('%d', d),
      'r', ARGV[3 * i])
    -- Full again after d / rate microseconds; a second more keeps clock jitter harmless.
    redis.call('PEXPIRE', KEYS[i], string.format('%d', cdiv(cdiv(d, rate), 1000) + 1000))
  end
end
return {1}
