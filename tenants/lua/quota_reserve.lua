-- Reserve `amount` tokens of a tenant's budget period, refused when used + reserved + amount
-- would pass the budget. Reservations expire, so a holder that died gives its tokens back.
-- KEYS: 1 used tokens of the period  2 holds (zset id -> expiry ms)  3 amounts (hash id -> tokens)
-- ARGV: request id, amount, budget, hold ms, seed ('' = none), used key expiry (unix ms)
-- Returns {1, used, reserved} admitted, {0, used, reserved} refused, {-1} no counter: the caller
-- sums the period's usage from the database and calls again with it as the seed. SET NX makes
-- the first seed win, so racing seeders cannot count the period twice.
local id, amount, budget = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if ARGV[5] ~= '' then
  redis.call('SET', KEYS[1], ARGV[5], 'NX', 'PXAT', ARGV[6])
end
local used = redis.call('GET', KEYS[1])
if not used then return {-1} end
used = tonumber(used)

local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('HDEL', KEYS[3], dead)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
-- Holds are few (at most the tenant's concurrent requests), so summing them is cheap.
local reserved = 0
for _, held in ipairs(redis.call('HVALS', KEYS[3])) do reserved = reserved + tonumber(held) end
if used + reserved + amount > budget then return {0, used, reserved} end

local hold = tonumber(ARGV[4])
redis.call('ZADD', KEYS[2], now + hold, id)
redis.call('HSET', KEYS[3], id, amount)
redis.call('PEXPIRE', KEYS[2], hold)
redis.call('PEXPIRE', KEYS[3], hold)
return {1, used, reserved + amount}
