-- Hold ARGV amount in every counter, or in none; remember the grant by idempotency key.
-- KEYS[1] idempotency record (hash), KEYS[2] reservation (hash), KEYS[3] tenant expiry
-- index (zset), KEYS[4..] counters (hash u=used r=reserved), last: the partition's event
-- stream (a refusal appends its denial event there, in this same step).
-- ARGV: amount, reservation id, expires_ms, context, metric, keep_ms, then per counter:
-- cap ('' = none), end_ms ('' = none), then the request time (ms).
-- Returns {1, id, expires_ms, context, u1, r1, ...} for a replay, {0, u1, r1, ...} when
-- a cap refuses, {2, u1, r1, ...} when granted. Numbers are exact up to 2^53.
local first = redis.call('HMGET', KEYS[1], 'id', 'exp', 'ctx', 'usage')
if first[1] then
  local out = {1, first[1], first[2], first[3]}
  for v in string.gmatch(first[4], '[^,]+') do out[#out + 1] = v end
  return out
end
local amount = tonumber(ARGV[1])
local n = #KEYS - 4
local stream = KEYS[#KEYS]
local at = ARGV[6 + 2 * n + 1]
local usage = {}
local fits = true
for i = 1, n do
  local c = redis.call('HMGET', KEYS[3 + i], 'u', 'r')
  local u, r = tonumber(c[1] or '0'), tonumber(c[2] or '0')
  usage[#usage + 1] = u
  usage[#usage + 1] = r
  local cap = ARGV[6 + 2 * i - 1]
  if cap ~= '' and u + r + amount > tonumber(cap) then fits = false end
end
if not fits then
  local out = {0}
  local flat = {}
  for _, v in ipairs(usage) do flat[#flat + 1] = string.format('%d', v) end
  redis.call('XADD', stream, '*', 'k', 'denial', 'i', ARGV[2] .. '/denied', 'a', ARGV[1],
    't', at, 'c', ARGV[4], 'u', table.concat(flat, ','), 'g', '0')
  for _, v in ipairs(flat) do out[#out + 1] = v end
  return out
end
local keep = tonumber(ARGV[6])
local slots = {}
for i = 1, n do
  local key = KEYS[3 + i]
  redis.call('HINCRBY', key, 'r', amount)
  local ends = ARGV[6 + 2 * i]
  if ends ~= '' then redis.call('PEXPIREAT', key, tonumber(ends) + keep) end
  slots[#slots + 1] = key
end
local flat = {}
for _, v in ipairs(usage) do flat[#flat + 1] = string.format('%d', v) end
local usage_text = table.concat(flat, ',')
local expires = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'id', ARGV[2], 'exp', ARGV[3], 'ctx', ARGV[4], 'usage', usage_text)
redis.call('PEXPIREAT', KEYS[1], expires + keep)
redis.call('HSET', KEYS[2], 'amount', ARGV[1], 'metric', ARGV[5], 'exp', ARGV[3],
  'state', 'held', 'slots', table.concat(slots, '\n'), 'ctx', ARGV[4], 'usage', usage_text)
redis.call('PEXPIREAT', KEYS[2], expires + keep)
redis.call('ZADD', KEYS[3], expires, ARGV[2])
local out = {2}
for _, v in ipairs(flat) do out[#out + 1] = v end
return out
