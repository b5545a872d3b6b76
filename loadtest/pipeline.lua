-- wrk: PIPELINE_DEPTH [16] requests written at once on each connection (HTTP/1.1
-- pipelining, RFC 9112 §9.3); each answer is counted, the latency is the batch's.
--   wrk -t1 -c50 -d5s -s loadtest/pipeline.lua http://127.0.0.1:8080/restaurant/dufva
local depth = tonumber(os.getenv("PIPELINE_DEPTH") or "16")

init = function(args)
  local batch = {}
  for i = 1, depth do
    batch[i] = wrk.format(nil)
  end
  req = table.concat(batch)
end

request = function()
  return req
end
