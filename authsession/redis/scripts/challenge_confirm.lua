-- Moves a `sent` challenge to `confirmed_pending_expire`, atomically, at most once.
--
-- Guarantees: of any number of concurrent callers, exactly one performs the transition;
-- every other caller gets the winner's record back (and so the winner's session id and
-- token). A challenge that is gone, expired, exhausted or never sent is not confirmed.
--
-- KEYS[1]  <prefix>challenge:<challenge_id>
-- ARGV[1]  now (RFC 3339 UTC, milliseconds)
-- ARGV[2]  maximum attempts
-- ARGV[3]  device_session_id    ARGV[4] session_token    ARGV[5] user_id
-- ARGV[6]  new expires_at (now + idempotency window, RFC 3339)
-- ARGV[7]  absolute expiry of the key in epoch milliseconds (expires_at + retention)
-- Returns  {'confirmed', field1, value1, ...} | {'not_found'} | {'not_sent'}
--          | {'expired'} | {'exhausted'}
local h = redis.call('HMGET', KEYS[1], 'status', 'expires_at', 'attempts')
if not h[1] then
  return {'not_found'}
end
if h[1] == 'confirmed_pending_expire' then
  local all = redis.call('HGETALL', KEYS[1])
  table.insert(all, 1, 'confirmed')
  return all
end
if h[1] ~= 'sent' then
  return {'not_sent'}
end
if ARGV[1] >= h[2] then
  return {'expired'}
end
if (tonumber(h[3]) or 0) >= tonumber(ARGV[2]) then
  return {'exhausted'}
end
redis.call('HSET', KEYS[1],
  'status', 'confirmed_pending_expire',
  'device_session_id', ARGV[3],
  'session_token', ARGV[4],
  'user_id', ARGV[5],
  'expires_at', ARGV[6])
-- The address was kept only to create the user at confirm; it is not needed any more.
redis.call('HDEL', KEYS[1], 'email')
redis.call('PEXPIREAT', KEYS[1], ARGV[7])
local all = redis.call('HGETALL', KEYS[1])
table.insert(all, 1, 'confirmed')
return all
