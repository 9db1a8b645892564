-- Compare-and-set of a billing provider object's sync record: nodes may receive the same
-- object's deliveries at once, and only the one that read the current revision may write.
--
-- KEYS[1] the record (hash: rev, text). ARGV[1] the revision the writer read (0: none),
-- ARGV[2] the new text. Returns 1 when written (as revision ARGV[1] + 1), 0 when the
-- revision moved on (nothing written).
local rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
if rev ~= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'rev', rev + 1, 'text', ARGV[2])
return 1
