-- Shared by ratelimit_admit.lua and ratelimit_peek.lua (prepended by LuaScript): the state of the
-- sliding windows and leases now, after forgetting what left the window and leases whose holder
-- died without settling. KEYS 1-5 as ratelimit_admit.lua names them.
-- Returns now (Redis' clock: one for every web worker), requests, tokens and running.
local function window_state(window)
  local clock = redis.call('TIME')
  local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
  local horizon = now - window
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', horizon)
  local total = tonumber(redis.call('GET', KEYS[4]) or '0')
  local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', horizon)
  for _, old in ipairs(gone) do
    total = total - tonumber(redis.call('HGET', KEYS[3], old) or '0')
    redis.call('HDEL', KEYS[3], old)
  end
  if #gone > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', horizon)
    redis.call('SET', KEYS[4], total, 'KEEPTTL')
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
  return now, redis.call('ZCARD', KEYS[1]), total, redis.call('ZCARD', KEYS[5])
end

-- ms until the newest entry of a log leaves the window (the limit is whole again)
local function reset_in(log, window, now)
  local newest = redis.call('ZRANGE', log, -1, -1, 'WITHSCORES')
  if #newest == 0 then return 0 end
  return tonumber(newest[2]) + window - now
end

