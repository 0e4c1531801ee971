-- Reserves one slot of an e-mail's rolling-window failure budget, atomically.
--
-- Guarantees: the members inside the window never exceed the limit, however many
-- confirms run at once: a confirm evaluates a code only after it holds a slot. The
-- caller keeps the slot when the code was wrong (it is the recorded failure) and
-- removes it (ZREM) otherwise.
--
-- KEYS[1]  <prefix>failures:<email_hash>
-- ARGV[1]  now, epoch milliseconds    ARGV[2] window, milliseconds
-- ARGV[3]  limit                      ARGV[4] unique member for this confirm
-- Returns  1 if reserved, 0 if the budget is exhausted
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
