-- Evaluates one confirm attempt against a challenge, atomically.
--
-- Guarantees: a mismatch consumes exactly one attempt, and no evaluation happens once
-- `attempts` has reached the maximum, so any number of concurrent wrong codes get at most
-- `max_attempts` evaluations. A match changes nothing (the transition is a second script).
-- The HMAC comparison walks the whole string without an early exit.
--
-- KEYS[1]  <prefix>challenge:<challenge_id>
-- ARGV[1]  now, RFC 3339 UTC with milliseconds (same fixed width as expires_at)
-- ARGV[2]  HMAC of the submitted code under the challenge's salt ('' if it has none)
-- ARGV[3]  maximum attempts
-- Returns  {'not_found'} | {'expired'} | {'exhausted'} | {'wrong', remaining}
--          | {'match', field1, value1, ...} (the whole hash)
local h = redis.call('HMGET', KEYS[1], 'status', 'expires_at', 'attempts', 'code_hmac')
if not h[1] then
  return {'not_found'}
end
if ARGV[1] >= h[2] then
  return {'expired'}
end
local attempts = tonumber(h[3]) or 0
local max_attempts = tonumber(ARGV[3])
if attempts >= max_attempts then
  return {'exhausted'}
end
local stored = h[4] or ''
local candidate = ARGV[2]
local diff = 0
if #stored ~= #candidate or #stored == 0 then
  diff = 1
end
for i = 1, #candidate do
  if string.byte(candidate, i) ~= string.byte(stored, i) then
    diff = diff + 1
  end
end
if diff == 0 and (h[1] == 'sent' or h[1] == 'confirmed_pending_expire') then
  local all = redis.call('HGETALL', KEYS[1])
  table.insert(all, 1, 'match')
  return all
end
attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
return {'wrong', tostring(max_attempts - attempts)}
