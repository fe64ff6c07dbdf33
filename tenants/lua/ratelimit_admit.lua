-- Admit one request under four limits at once: requests per window, tokens per window (sliding
-- logs), concurrent requests, and sequences in flight (leases; a request holds n x prompts
-- sequences). Nothing is written unless all four admit it.
-- KEYS: 1 request log (zset id -> admitted ms)    2 token log (zset id -> admitted ms)
--       3 token counts (hash id -> tokens)         4 token total (sum of 3)
--       5 leases (zset id -> lease expiry ms)
--       6 sequence leases (zset id -> lease expiry ms)  7 sequence counts (hash id -> sequences)
-- ARGV: request id, tokens, request limit, token limit, concurrency limit, window ms, lease ms,
--       sequences, sequence limit
-- Returns {admitted, refused limit or '', wait ms, requests used, requests reset ms,
--          tokens used, tokens reset ms, running, sequences in flight}; "used", "running" and
--          "in flight" count this request when admitted.
local id, tokens = ARGV[1], tonumber(ARGV[2])
local max_requests, max_tokens = tonumber(ARGV[3]), tonumber(ARGV[4])
local max_running = tonumber(ARGV[5])
local window, lease = tonumber(ARGV[6]), tonumber(ARGV[7])
local sequences, max_sequences = tonumber(ARGV[8]), tonumber(ARGV[9])
-- Forget what left the window, and leases whose holder died without settling.
local now, requests, total, running = window_state(window)
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', now)) do
  redis.call('HDEL', KEYS[7], dead)
end
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now)
-- Holds are few (each is a request in flight, at most the limit), so summing them is cheap.
local in_flight = 0
for _, held in ipairs(redis.call('HVALS', KEYS[7])) do in_flight = in_flight + tonumber(held) end

-- ms until enough of the oldest token entries leave the window to free `need` tokens
local function tokens_free_in(need)
  local freed, entries = 0, redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  for i = 1, #entries, 2 do
    freed = freed + tonumber(redis.call('HGET', KEYS[3], entries[i]) or '0')
    if freed >= need then return tonumber(entries[i + 1]) + window - now end
  end
  return window  -- larger than the limit itself: never fits
end

local refused, wait = '', -1
local function refuse(limit, ms)
  if ms > wait then refused, wait = limit, ms end
end
if requests + 1 > max_requests then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  refuse('requests', #oldest == 0 and window or tonumber(oldest[2]) + window - now)
end
if total + tokens > max_tokens then
  refuse('tokens', tokens_free_in(total + tokens - max_tokens))
end
if running + 1 > max_running then
  refuse('concurrency', 0)  -- a slot frees when a request ends, which no clock predicts
end
if in_flight + sequences > max_sequences then
  refuse('sequences', 0)
end
if refused ~= '' then
  return {0, refused, wait, requests, reset_in(KEYS[1], window, now), total, reset_in(KEYS[2], window, now), running, in_flight}
end

redis.call('ZADD', KEYS[1], now, id)
redis.call('ZADD', KEYS[2], now, id)
redis.call('HSET', KEYS[3], id, tokens)
redis.call('SET', KEYS[4], total + tokens)
redis.call('ZADD', KEYS[5], now + lease, id)
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], window) end
redis.call('PEXPIRE', KEYS[5], lease)
redis.call('ZADD', KEYS[6], now + lease, id)
redis.call('HSET', KEYS[7], id, sequences)
redis.call('PEXPIRE', KEYS[6], lease)
redis.call('PEXPIRE', KEYS[7], lease)
return {1, '', 0, requests + 1, window, total + tokens, window, running + 1, in_flight + sequences}
