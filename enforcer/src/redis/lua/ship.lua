-- Append events from a node's local spool to one partition's stream, once: a node ships
-- its spool in sequence order, so a per-node high-water mark per partition tells a
-- repeated shipment (the node died between this and forgetting the events) from a new one.
-- A record also counts once per event id across nodes: a client that retried a soft-only
-- Record on another node (the first answer was lost) has it counted on both, but only the
-- first to arrive here is appended; the event record it leaves is the one the record
-- script keeps, so every path dedups against every other.
-- Many events in one call, so that shipping costs one round trip (and, with
-- `appendfsync always`, one fsync) per partition and batch rather than per event.
-- KEYS[1] the partition's stream, KEYS[2] its shipped marks (hash node -> last sequence),
-- then the event records of the records shipped.
-- ARGV: node, keep_ms, then for each event, in increasing sequence: its sequence, the
-- index in KEYS of its event record (0: not a record), the number n of strings that
-- follow, then its fields as n strings (name, value pairs).
-- Returns {appended}: how many were new (the others were shipped or counted before).
local last = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local keep = tonumber(ARGV[2])
local mark = nil
local appended = 0
local i = 3
while i <= #ARGV do
  local seq, once, n = tonumber(ARGV[i]), tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  if seq > last then
    last, mark = seq, ARGV[i]
    local fresh = true
    if once > 0 then
      fresh = redis.call('EXISTS', KEYS[once]) == 0
      if fresh then
        local ctx, usage = '', ''
        for f = i + 3, i + 2 + n, 2 do
          if ARGV[f] == 'c' then ctx = ARGV[f + 1] elseif ARGV[f] == 'u' then usage = ARGV[f + 1] end
        end
        redis.call('HSET', KEYS[once], 'ctx', ctx, 'usage', usage)
        redis.call('PEXPIRE', KEYS[once], keep)
      end
    end
    if fresh then
      redis.call('XADD', KEYS[1], '*', unpack(ARGV, i + 3, i + 2 + n))
      appended = appended + 1
    end
  end
  i = i + 3 + n
end
if mark then redis.call('HSET', KEYS[2], ARGV[1], mark) end
return {appended}
