-- Adds a session to a user's index and keeps the index alive as long as its longest-lived
-- member.
--
-- KEYS[1]  <prefix>user_sessions:<user_id>
-- ARGV[1]  score (creation time, epoch milliseconds)    ARGV[2] device_session_id
-- ARGV[3]  now, epoch milliseconds    ARGV[4] member's key expiry, epoch milliseconds
-- Returns  1
redis.call('ZADD', KEYS[1], 'NX', ARGV[1], ARGV[2])
local ttl = redis.call('PTTL', KEYS[1])
local wanted = tonumber(ARGV[4]) - tonumber(ARGV[3])
if ttl < 0 or ttl < wanted then
  redis.call('PEXPIREAT', KEYS[1], ARGV[4])
end
return 1
