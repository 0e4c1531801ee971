-- Clears a pending-event marker once the event of that version is in the stream.
--
-- Guarantees: never clears the marker of another (newer) version.
--
-- KEYS[1]  <prefix>projection_pending:{<snapshot key>}
-- ARGV[1]  version whose event was appended
-- Returns  1 if cleared, 0 otherwise
local marker = redis.call('GET', KEYS[1])
if marker and tonumber(string.match(marker, '^(%d+)')) == tonumber(ARGV[1]) then
  return redis.call('DEL', KEYS[1])
end
return 0
