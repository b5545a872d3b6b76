-- GCRA for cluster-scope rate limits (see cluster.rs): KEYS[1] the bucket, ARGV[1] the
-- interval T in microseconds, ARGV[2] the burst B. Answers {allowed, wait_us, full_in_us, remaining}.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local T = tonumber(ARGV[1])
local B = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local earliest = tat - (B - 1) * T
if now < earliest then
  return {0, earliest - now, tat - now, 0}
end
tat = tat + T
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
local remaining = math.floor(B - (tat - now) / T)
if remaining < 0 then remaining = 0 end
return {1, 0, tat - now, remaining}
