-- Opens a resend-cooldown window unless one is open, but only before a deadline.
--
-- Guarantees: throttled requests never extend a window (SET NX); and a call that Redis
-- executes after its caller gave up waiting (a paused or overloaded Redis answers late,
-- the caller has already answered 503) changes nothing, so it cannot throttle the
-- user's retry. The deadline is in Redis's own clock (the caller keeps an estimate of the
-- offset between its clock and Redis's, from the times this script returns).
--
-- KEYS[1]  the window's key (<prefix>throttle:{tag}:<email_hash> or the user's)
-- ARGV[1]  owner token (the challenge id)    ARGV[2] cooldown in milliseconds
-- ARGV[3]  deadline, epoch milliseconds in Redis's clock (0: none)
-- Returns  {1 opened | 0 inside a window | -1 past the deadline, Redis time in ms}
if redis.replicate_commands then
  redis.replicate_commands()  -- Redis < 7: TIME before a write needs effects replication
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = tonumber(ARGV[3])
if deadline > 0 and now > deadline then
  return {-1, now}
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, now}
end
return {0, now}
