-- Count a signed amount at once, deduplicated by event id.
-- KEYS[1] event record (hash), KEYS[2..] counters (hash u=used r=reserved), last: the
-- partition's event stream (the record, or its denial, is appended in this same step).
-- ARGV: amount (signed), context, keep_ms, force ('1': count past caps, for usage that
-- was admitted while this store was unreachable), then per counter: cap, end_ms, then the
-- event id and the event time (ms).
-- Returns {1, context, u1, r1, ...} replay; {0, u1, r1, ...} refused by a cap;
-- {-1, index, used} a gauge would go below zero; {2, u1, r1, ...} counted.
local first = redis.call('HMGET', KEYS[1], 'ctx', 'usage')
if first[1] then
  local out = {1, first[1]}
  for v in string.gmatch(first[2], '[^,]+') do out[#out + 1] = v end
  return out
end
local amount = tonumber(ARGV[1])
local force = ARGV[4] == '1'
local n = #KEYS - 2
local stream = KEYS[#KEYS]
local event_id, at = ARGV[4 + 2 * n + 1], ARGV[4 + 2 * n + 2]
local usage = {}
local fits = true
for i = 1, n do
  local c = redis.call('HMGET', KEYS[1 + i], 'u', 'r')
  local u, r = tonumber(c[1] or '0'), tonumber(c[2] or '0')
  usage[#usage + 1] = string.format('%d', u)
  usage[#usage + 1] = string.format('%d', r)
  if amount < 0 and u + amount < 0 then return {-1, i, string.format('%d', u)} end
  local cap = ARGV[4 + 2 * i - 1]
  if amount > 0 and not force and cap ~= '' and u + r + amount > tonumber(cap) then
    fits = false
  end
end
if not fits then
  redis.call('XADD', stream, '*', 'k', 'denial', 'i', event_id .. '/denied', 'a', ARGV[1],
    't', at, 'c', ARGV[2], 'u', table.concat(usage, ','), 'g', '0')
  local out = {0}
  for _, v in ipairs(usage) do out[#out + 1] = v end
  return out
end
local keep = tonumber(ARGV[3])
for i = 1, n do
  local key = KEYS[1 + i]
  redis.call('HINCRBY', key, 'u', amount)
  local ends = ARGV[4 + 2 * i]
  if ends ~= '' then redis.call('PEXPIREAT', key, tonumber(ends) + keep) end
end
redis.call('HSET', KEYS[1], 'ctx', ARGV[2], 'usage', table.concat(usage, ','))
redis.call('XADD', stream, '*', 'k', 'record', 'i', event_id, 'a', ARGV[1], 't', at,
  'c', ARGV[2], 'u', table.concat(usage, ','), 'g', '1')
redis.call('PEXPIRE', KEYS[1], keep)
local out = {2}
for _, v in ipairs(usage) do out[#out + 1] = v end
return out
