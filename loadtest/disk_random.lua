-- wrk script: GET /k/<n> for n drawn uniformly from 0 .. KEYS-1 (env KEYS, default 1000).
-- wrk -t1 -c8 -d10s -s loadtest/disk_random.lua http://127.0.0.1:19601
local keys = tonumber(os.getenv("KEYS") or "1000")
math.randomseed(42)
request = function()
  return wrk.format("GET", "/k/" .. math.random(0, keys - 1))
end
