-- Would one more request fit under the three limits right now? Writes nothing but the pruning
-- (ratelimit_window.lua, shared with ratelimit_admit.lua): a cheap check before a request's heavy
-- work (tokenizing), so a tenant at its limit is refused before it costs anything. Admission stays exact: it is
-- ratelimit_admit.lua that takes the slot, later.
-- KEYS: as ratelimit_admit.lua.  ARGV: request limit, token limit, concurrency limit, window ms
-- Returns {admitted, refused limit or '', wait ms, requests used, requests reset ms,
--          tokens used, tokens reset ms, running}, as ratelimit_admit.lua does.
local max_requests, max_tokens = tonumber(ARGV[1]), tonumber(ARGV[2])
local max_running, window = tonumber(ARGV[3]), tonumber(ARGV[4])
local now, requests, total, running = window_state(window)

local function oldest_leaves_in(log)
  local oldest = redis.call('ZRANGE', log, 0, 0, 'WITHSCORES')
  if #oldest == 0 then return 0 end
  return tonumber(oldest[2]) + window - now
end

local refused, wait = '', 0
if requests + 1 > max_requests then
  refused, wait = 'requests', oldest_leaves_in(KEYS[1])
elseif total + 1 > max_tokens then  -- not one token left: no request fits
  refused, wait = 'tokens', oldest_leaves_in(KEYS[2])
elseif running + 1 > max_running then
  refused, wait = 'concurrency', 0
end
return {refused == '' and 1 or 0, refused, wait, requests, reset_in(KEYS[1], window, now),
        total, reset_in(KEYS[2], window, now), running}
