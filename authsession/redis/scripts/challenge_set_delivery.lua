-- Records the delivery outcome of a challenge that is still `pending_delivery`.
--
-- Guarantees: never moves a challenge that has left `pending_delivery` (for instance one
-- already confirmed), and never recreates a record that Redis dropped.
--
-- KEYS[1]  <prefix>challenge:<challenge_id>
-- ARGV[1]  new status (`sent` or `delivery_failed`)
-- Returns  1 if the status changed, 0 otherwise
if redis.call('HGET', KEYS[1], 'status') == 'pending_delivery' then
  redis.call('HSET', KEYS[1], 'status', ARGV[1])
  return 1
end
return 0
