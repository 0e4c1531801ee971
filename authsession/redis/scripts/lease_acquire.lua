-- Takes or renews the lease of a periodic job, so that one process runs it at a time.
--
-- Guarantees: the lease has at most one holder; its holder renews it, anyone takes it
-- once it has run out.
--
-- KEYS[1]  <prefix>lease:<job>
-- ARGV[1]  holder id    ARGV[2] lease length in milliseconds
-- Returns  1 if the caller holds the lease now, 0 otherwise
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
