-- Commit ('c', with ARGV[2] actual), release ('r') or expire ('x') a reservation.
-- KEYS[1] reservation (hash), KEYS[2] tenant expiry index (zset), KEYS[3..] its counters,
-- exactly as stored in the reservation (the caller read them first; they never change),
-- last: the partition's event stream (the settlement's event is appended in this step).
-- ARGV: how, actual, now_ms, reservation id.
-- Returns {code, amount, state, metric}: code 1 applied, 2 replay of the same settlement,
-- 3 the reservation had reached its TTL (released now or before), -1 conflict,
-- -2 actual above amount, -3 not found, -4 stale counter keys.
local r = redis.call('HMGET', KEYS[1], 'amount', 'metric', 'exp', 'state', 'slots', 'ctx', 'usage')
if not r[1] then return {-3, 0, '', ''} end
local amount, metric, expires, state = tonumber(r[1]), r[2], tonumber(r[3]), r[4]
local how, actual, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local slots = {}
for i = 3, #KEYS - 1 do slots[#slots + 1] = KEYS[i] end
if table.concat(slots, '\n') ~= r[5] then return {-4, amount, state, metric} end
local wanted = how == 'c' and ('committed:' .. ARGV[2]) or (how == 'r' and 'released' or 'expired')
if state ~= 'held' then
  if state == wanted then return {2, amount, state, metric} end
  if state == 'expired' and how == 'r' then return {3, amount, state, metric} end
  return {-1, amount, state, metric}
end
if how == 'c' and actual > amount then return {-2, amount, state, metric} end
local lapsed = how ~= 'x' and now >= expires
if lapsed then wanted = 'expired' end
local used = 0
if not lapsed and how == 'c' then used = actual end
for _, key in ipairs(slots) do
  redis.call('HINCRBY', key, 'r', -amount)
  if used > 0 then redis.call('HINCRBY', key, 'u', used) end
end
redis.call('HSET', KEYS[1], 'state', wanted)
redis.call('ZREM', KEYS[2], ARGV[4])
local kind, event_amount = 'release', amount
if lapsed or how == 'x' then kind = 'expire' elseif how == 'c' then kind, event_amount = 'commit', used end
redis.call('XADD', KEYS[#KEYS], '*', 'k', kind, 'i', ARGV[4] .. '/' .. kind,
  'a', string.format('%d', event_amount), 't', ARGV[3], 'c', r[6] or '', 'u', r[7] or '',
  'g', '1')
if lapsed then return {3, amount, wanted, metric} end
return {1, amount, wanted, metric}
