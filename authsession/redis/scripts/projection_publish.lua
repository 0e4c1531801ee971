-- Writes a gateway snapshot unless the key already holds the same or a higher version.
--
-- Guarantees: a publication never replaces a higher version (so a late publication can
-- never make a revoked session active again); the same version is not rewritten. The
-- key expires at the session's expires_at.
--
-- KEYS[1]  <GATEWAY_SESSION_KEY_PREFIX><device_session_id>
-- ARGV[1]  version    ARGV[2] snapshot JSON
-- ARGV[3]  expires_at in epoch milliseconds    ARGV[4] now in epoch milliseconds
-- Returns  {'written'} | {'unchanged', held JSON} | {'stale'}
--          (an unchanged publication appends the document the key holds, so the event
--          always carries exactly the snapshot gateways can read)
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
      return {'unchanged', current}
    end
  end
end
if tonumber(ARGV[3]) <= tonumber(ARGV[4]) then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PXAT', ARGV[3])
end
return {'written'}
