-- Writes a new session record unless one exists.
--
-- Guarantees: create-if-absent, so a retried or concurrent creation never overwrites a
-- session, and in particular never turns a revoked session active again.
--
-- KEYS[1]  <prefix>session:<device_session_id>
-- ARGV[1]  absolute expiry of the key in epoch milliseconds (expires_at + retention)
-- ARGV[2…] field, value, field, value, …
-- Returns  1 if written, 0 if the session already existed
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local fields = {}
for i = 2, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('PEXPIREAT', KEYS[1], ARGV[1])
return 1
