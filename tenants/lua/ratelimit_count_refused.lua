-- Count a refused request against requests per minute (OpenAI does: resending a bad request does
-- not get around the limit), but never past the limit: a tenant hammering at its limit neither
-- grows the log nor pushes its own reset further away.
-- KEYS: 1 request log (zset id -> admitted ms).  ARGV: request id, request limit, window ms
-- Returns 1 when counted, 0 when the log was already full.
local id, max_requests, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= max_requests then return 0 end
redis.call('ZADD', KEYS[1], now, id)
redis.call('PEXPIRE', KEYS[1], window)
return 1
