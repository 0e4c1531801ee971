-- Moves the expiry of an active session.
--
-- Guarantees: a revoked or expired session is never extended (revocation is permanent);
-- each extension increments `version`.
--
-- KEYS[1]  <prefix>session:<device_session_id>
-- ARGV[1]  now (RFC 3339 UTC)    ARGV[2] new expires_at (RFC 3339 UTC)
-- ARGV[3]  absolute expiry of the key in epoch milliseconds (new expires_at + retention)
-- Returns  {'not_found'} | {'not_active'} | {'extended', field1, value1, ...}
local h = redis.call('HMGET', KEYS[1], 'status', 'expires_at')
if not h[1] then
  return {'not_found'}
end
if h[1] == 'revoked' or ARGV[1] >= h[2] then
  return {'not_active'}
end
redis.call('HSET', KEYS[1], 'expires_at', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
local all = redis.call('HGETALL', KEYS[1])
table.insert(all, 1, 'extended')
return all
