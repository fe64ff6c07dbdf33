-- Would one more request fit under the three limits right now? Written nothing but the pruning
-- ratelimit_admit.lua does too: a cheap check before a request's heavy work (tokenizing), so a
-- tenant at its limit is refused before it costs anything. Admission stays exact: it is
-- ratelimit_admit.lua that takes the slot, later.
-- KEYS: as ratelimit_admit.lua.  ARGV: request limit, token limit, concurrency limit, window ms
-- Returns {admitted, refused limit or '', wait ms, requests used, requests reset ms,
--          tokens used, tokens reset ms, running}, as ratelimit_admit.lua does.
local max_requests, max_tokens = tonumber(ARGV[1]), tonumber(ARGV[2])
local max_running, window = tonumber(ARGV[3]), tonumber(ARGV[4])
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
local requests = redis.call('ZCARD', KEYS[1])
local running = redis.call('ZCARD', KEYS[5])

local function oldest_leaves_in(log)
  local oldest = redis.call('ZRANGE', log, 0, 0, 'WITHSCORES')
  if #oldest == 0 then return 0 end
  return tonumber(oldest[2]) + window - now
end
local function reset_in(log)
  local newest = redis.call('ZRANGE', log, -1, -1, 'WITHSCORES')
  if #newest == 0 then return 0 end
  return tonumber(newest[2]) + window - now
end

local refused, wait = '', 0
if requests + 1 > max_requests then
  refused, wait = 'requests', oldest_leaves_in(KEYS[1])
elseif total + 1 > max_tokens then  -- not one token left: no request fits
  refused, wait = 'tokens', oldest_leaves_in(KEYS[2])
elseif running + 1 > max_running then
  refused, wait = 'concurrency', 0
end
return {refused == '' and 1 or 0, refused, wait, requests, reset_in(KEYS[1]), total, reset_in(KEYS[2]), running}
