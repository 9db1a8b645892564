-- A control change and its ledger entry, in one step (every key is the tenant's, in one
-- Cluster slot): a change is never made without its entry, nor recorded without being
-- made.
--
-- KEYS[1] the tenant's ledger index (sorted set: entry id by time in ms), KEYS[2] its
-- entries (hash: id -> JSON), KEYS[3] the key the change writes (unused for 'none').
-- ARGV[1] entry id, ARGV[2] entry (JSON), ARGV[3] its time (ms), ARGV[4] op: 'none'
-- (record only), 'set' (SET KEYS[3] ARGV[6]), 'hsetnx' (add field ARGV[5] = ARGV[6],
-- refused if present), 'hdel' (remove field ARGV[5], nothing recorded if absent).
-- Returns 1 when applied and recorded, 0 when the op refused (nothing written), -1 when
-- the entry id was recorded before (nothing written).
local op = ARGV[4]
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  return -1
end
if op == 'set' then
  redis.call('SET', KEYS[3], ARGV[6])
elseif op == 'hsetnx' then
  if redis.call('HSETNX', KEYS[3], ARGV[5], ARGV[6]) == 0 then
    return 0
  end
elseif op == 'hdel' then
  if redis.call('HDEL', KEYS[3], ARGV[5]) == 0 then
    return 0
  end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
