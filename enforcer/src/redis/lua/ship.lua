-- Append an event from a node's local spool to its partition's stream, once: a node ships
-- its spool in sequence order, so a per-node high-water mark per partition tells a
-- repeated shipment (the node died between this and forgetting the event) from a new one.
-- KEYS[1] the partition's stream, KEYS[2] its shipped marks (hash node -> last sequence).
-- ARGV: node, sequence, then the event's fields as name, value pairs.
-- Returns {1} appended, {0} already shipped.
local last = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local seq = tonumber(ARGV[2])
if seq <= last then return {0} end
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[1], '*', unpack(fields))
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return {1}
