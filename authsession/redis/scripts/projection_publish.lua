-- Writes a gateway snapshot unless the key already holds the same or a higher version,
-- and marks the publication's stream event as not yet appended.
--
-- Guarantees: a publication never replaces a higher version (so a late publication can
-- never make a revoked session active again); the same version is not rewritten. The
-- key expires at the session's expires_at. The pending marker (same slot: its hash tag
-- is the snapshot key) is set with the snapshot and cleared by the publisher once the
-- event is in the stream, so a publication whose event failed is completed by the next
-- publication of that version or by the reconciler.
--
-- KEYS[1]  <GATEWAY_SESSION_KEY_PREFIX><device_session_id>
-- KEYS[2]  <prefix>projection_pending:{<KEYS[1]>}
-- ARGV[1]  version    ARGV[2] snapshot JSON
-- ARGV[3]  expires_at in epoch milliseconds    ARGV[4] now in epoch milliseconds
-- Returns  {'written', marked (1/0)} | {'unchanged', held JSON, pending (1/0)} | {'stale'}
--          (an unchanged publication returns the document the key holds, so that an
--          event always carries exactly the snapshot gateways can read)
local current = redis.call('GET', KEYS[1])
local version = tonumber(ARGV[1])
if current then
  local ok, doc = pcall(cjson.decode, current)
  local held = ok and type(doc) == 'table' and tonumber(doc['version']) or nil
  if held ~= nil then
    if held > version then
      return {'stale'}
    end
    if held == version then
      local marker = redis.call('GET', KEYS[2])
      local pending = 0
      if marker and tonumber(string.match(marker, '^(%d+)')) == version then
        pending = 1
      end
      return {'unchanged', current, pending}
    end
  end
end
if tonumber(ARGV[3]) <= tonumber(ARGV[4]) then
  redis.call('DEL', KEYS[1], KEYS[2])
  return {'written', 0}
end
redis.call('SET', KEYS[1], ARGV[2], 'PXAT', ARGV[3])
redis.call('SET', KEYS[2], ARGV[1] .. ':' .. ARGV[4], 'PXAT', ARGV[3])
return {'written', 1}
