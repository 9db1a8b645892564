-- Append events from a node's local spool to one partition's stream, once: a node ships
-- its spool in sequence order, so a per-node high-water mark per partition tells a
-- repeated shipment (the node died between this and forgetting the events) from a new one.
-- Many events in one call, so that shipping costs one round trip (and, with
-- `appendfsync always`, one fsync) per partition and batch rather than per event.
-- KEYS[1] the partition's stream, KEYS[2] its shipped marks (hash node -> last sequence).
-- ARGV: node, then for each event, in increasing sequence: its sequence, the number n of
-- strings that follow, then its fields as n strings (name, value pairs).
-- Returns {appended}: how many were new (the others were shipped before).
local last = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local mark = nil
local appended = 0
local i = 2
while i <= #ARGV do
  local seq, n = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  if seq > last then
    redis.call('XADD', KEYS[1], '*', unpack(ARGV, i + 2, i + 1 + n))
    last, mark = seq, ARGV[i]
    appended = appended + 1
  end
  i = i + 2 + n
end
if mark then redis.call('HSET', KEYS[2], ARGV[1], mark) end
return {appended}
