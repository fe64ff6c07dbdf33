-- Settle one request against its budget period: drop its hold, add the tokens it really used.
-- A missing counter is left missing: the request's usage event will be in the database sum
-- that seeds it (creating it here would start the period from this request alone).
-- KEYS: as quota_reserve.lua.  ARGV: request id, actual tokens
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
if tonumber(ARGV[2]) > 0 and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('INCRBY', KEYS[1], ARGV[2])
end
return 1
