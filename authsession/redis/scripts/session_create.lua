-- Creates a session in its user's hash slot: the index entry, the record, and the
-- session limit, all in one atomic step.
--
-- Guarantees: create-if-absent (a retried or concurrent creation never overwrites a
-- session, so never turns a revoked one active again); never creates a session for a user
-- with a block marker (so a block's revoke-all cannot miss a session created meanwhile);
-- with a limit N > 0, after any number of concurrent creations exactly the N newest active
-- sessions stay active, the new one always among them (it is the newest: a creation whose
-- time is not above every indexed one is refused with 'older' and retried with a later
-- time), and the others are revoked here with reason `session_limit`. The caller passes
-- the index members it read, so that every key the script touches is declared; if the
-- index changed since, the script refuses with 'retry'.
--
-- KEYS[1]  <prefix>user_sessions:{tag}:<user_id>     KEYS[2]  the new session's record
-- KEYS[3]  <prefix>blocked_user:{tag}:<user_id>      KEYS[4…] the members' records
-- ARGV[1]  record key expiry, epoch ms (expires_at + retention)
-- ARGV[2]  creation time, epoch ms (the index score)    ARGV[3] limit (0 = none)
-- ARGV[4]  now, RFC 3339 UTC (revoked_at of evictions)  ARGV[5] now, epoch ms
-- ARGV[6]  n = number of members passed (-1: not checked, only when the limit is 0)
-- ARGV[7 … 6+n]  the members' session ids, in the order of KEYS[4…]
-- ARGV[7+n …]    field, value, … of the new record (device_session_id first)
-- Returns  {'exists', f, v, …} | {'blocked'} | {'retry'} | {'older', highest score}
--          | {'created', {f, v, …} of each evicted session …}
if redis.call('EXISTS', KEYS[2]) == 1 then
  local all = redis.call('HGETALL', KEYS[2])
  table.insert(all, 1, 'exists')
  return all
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  return {'blocked'}
end
local limit = tonumber(ARGV[3])
local n = tonumber(ARGV[6])
local score = tonumber(ARGV[2])
local scores = {}
if n >= 0 then
  if redis.call('ZCARD', KEYS[1]) ~= n then
    return {'retry'}
  end
  local highest = nil
  for i = 1, n do
    local s = redis.call('ZSCORE', KEYS[1], ARGV[6 + i])
    if not s then
      return {'retry'}
    end
    s = tonumber(s)
    scores[i] = s
    if highest == nil or s > highest then
      highest = s
    end
  end
  if highest ~= nil and highest >= score then
    return {'older', tostring(highest)}
  end
end
local fields = {}
for i = 7 + math.max(n, 0), #ARGV do
  fields[#fields + 1] = ARGV[i]
end
-- fields[2] is the device_session_id (the caller sends it first).
redis.call('ZADD', KEYS[1], 'NX', score, fields[2])
local ttl = redis.call('PTTL', KEYS[1])
local wanted = tonumber(ARGV[1]) - tonumber(ARGV[5])
if ttl < 0 or ttl < wanted then
  redis.call('PEXPIREAT', KEYS[1], ARGV[1])
end
redis.call('HSET', KEYS[2], unpack(fields))
redis.call('PEXPIREAT', KEYS[2], ARGV[1])
local reply = {'created'}
if limit <= 0 or n <= 0 then
  return reply
end
local active = {}
for i = 1, n do
  local h = redis.call('HMGET', KEYS[3 + i], 'status', 'expires_at')
  if h[1] and h[1] ~= 'revoked' and h[2] and h[2] > ARGV[4] then
    active[#active + 1] = {scores[i], ARGV[6 + i], KEYS[3 + i]}
  end
end
-- Newest first (ties by id, descending, as the index lists them); the new session takes
-- one of the `limit` places.
table.sort(active, function(a, b)
  if a[1] ~= b[1] then
    return a[1] > b[1]
  end
  return a[2] > b[2]
end)
for i = limit, #active do
  local key = active[i][3]
  redis.call('HSET', key, 'status', 'revoked', 'revoked_at', ARGV[4],
    'revoke_reason', 'session_limit')
  redis.call('HINCRBY', key, 'version', 1)
  reply[#reply + 1] = redis.call('HGETALL', key)
end
return reply
