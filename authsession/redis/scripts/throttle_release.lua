-- Releases a resend-cooldown window, only if the caller is the one that opened it.
--
-- KEYS[1]  <prefix>throttle:<email_hash>
-- ARGV[1]  owner token written when the window was opened (the challenge id)
-- Returns  1 if released, 0 otherwise
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
