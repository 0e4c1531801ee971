-- Revokes a session, idempotently.
--
-- Guarantees: a revocation is permanent and happens once: `revoked_at` and the reason of
-- the first revocation are kept, and `version` is incremented only by that first one.
--
-- KEYS[1]  <prefix>session:<device_session_id>
-- ARGV[1]  revoked_at (RFC 3339 UTC)    ARGV[2] reason
-- Returns  {'not_found'} | {'revoked', field1, value1, ...} | {'unchanged', field1, …}
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'not_found'}
end
local result = 'unchanged'
if redis.call('HGET', KEYS[1], 'status') ~= 'revoked' then
  redis.call('HSET', KEYS[1], 'status', 'revoked', 'revoked_at', ARGV[1], 'revoke_reason', ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'version', 1)
  result = 'revoked'
end
local all = redis.call('HGETALL', KEYS[1])
table.insert(all, 1, result)
return all
