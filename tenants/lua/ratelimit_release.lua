-- Settle one admitted request: free its concurrency lease and its sequences, and correct its
-- token entry to the real count. With refund, withdraw it from both logs as if it had never been admitted.
-- KEYS: as ratelimit_admit.lua.  ARGV: request id, actual tokens, refund (1 or 0)
local id, actual, refund = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'
redis.call('ZREM', KEYS[5], id)
redis.call('ZREM', KEYS[6], id)
redis.call('HDEL', KEYS[7], id)
if refund then
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  actual = 0
end
-- Gone once the entry left the window: nothing left to correct.
local held = redis.call('HGET', KEYS[3], id)
if held then
  redis.call('INCRBY', KEYS[4], actual - tonumber(held))
  if refund then redis.call('HDEL', KEYS[3], id) else redis.call('HSET', KEYS[3], id, actual) end
end
return 1
