-- Revokes every session of a user but one, in the user's hash slot, atomically.
--
-- Guarantees: every session listed in the index at this instant, except the excluded
-- one, is revoked when this returns; a revocation is permanent and happens once (the
-- first revoked_at, reason and version bump are kept). It answers with every revoked
-- record (those it revoked and those revoked before) so that the caller can republish
-- any whose snapshot did not follow. The caller passes the members it read; if the index
-- changed since, the script refuses with 'retry'.
--
-- KEYS[1]  <prefix>user_sessions:{tag}:<user_id>    KEYS[2…] the members' records
-- ARGV[1]  n = number of members    ARGV[2 … 1+n] their session ids (order of KEYS[2…])
-- ARGV[2+n] revoked_at (RFC 3339 UTC)    ARGV[3+n] reason    ARGV[4+n] excluded id or ''
-- Returns  {'retry'} | {'done', {changed (1/0), f, v, …} …}
local n = tonumber(ARGV[1])
if redis.call('ZCARD', KEYS[1]) ~= n then
  return {'retry'}
end
for i = 1, n do
  if not redis.call('ZSCORE', KEYS[1], ARGV[1 + i]) then
    return {'retry'}
  end
end
local revoked_at, reason, except = ARGV[2 + n], ARGV[3 + n], ARGV[4 + n]
local reply = {'done'}
for i = 1, n do
  local key = KEYS[1 + i]
  if ARGV[1 + i] ~= except and redis.call('EXISTS', key) == 1 then
    local changed = 0
    if redis.call('HGET', key, 'status') ~= 'revoked' then
      redis.call('HSET', key, 'status', 'revoked', 'revoked_at', revoked_at,
        'revoke_reason', reason)
      redis.call('HINCRBY', key, 'version', 1)
      changed = 1
    end
    local all = redis.call('HGETALL', key)
    table.insert(all, 1, changed)
    reply[#reply + 1] = all
  end
end
return reply
