-- wrk script: the steady mixed load of `compare.sh --soak` (routes of the generated config).
-- 4 in 10 requests are cache hits, 2 misses (a 1 s TTL over 20,000 rotating keys),
-- 2 pass-through, 2 on a route limited to 200 requests/s per client (mostly 429s).
-- wrk -t1 -c50 -d10s -s loadtest/soak.lua http://127.0.0.1:19102
local ids = { "bikupan", "dufva", "glada", "haga", "hjulet", "hubben", "jons",
              "jorpes", "livet", "nanna", "rudbeck", "svarta", "tallrik" }
local i = 0
request = function()
  i = i + 1
  local m = i % 10
  local id = ids[(i % #ids) + 1]
  if m < 4 then
    return wrk.format("GET", "/restaurant/" .. id)
  elseif m < 6 then
    return wrk.format("GET", "/miss/restaurant/dufva?k=" .. (i % 100000))
  elseif m < 8 then
    return wrk.format("GET", "/api/restaurant/" .. id)
  else
    return wrk.format("GET", "/limited/restaurant/" .. id)
  end
end
