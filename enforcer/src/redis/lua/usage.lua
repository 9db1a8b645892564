-- Used and reserved of every counter in KEYS, as one consistent snapshot.
local out = {}
for i = 1, #KEYS do
  local c = redis.call('HMGET', KEYS[i], 'u', 'r')
  out[#out + 1] = c[1] or '0'
  out[#out + 1] = c[2] or '0'
end
return out
