-- Counts one request in a fixed window for one client.
--
-- KEYS[1]  <prefix>ratelimit:<client>:<window index>
-- ARGV[1]  window length in milliseconds
-- Returns  the number of requests in this window, this one included
local n = redis.call('INCR', KEYS[1])
if n == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return n
