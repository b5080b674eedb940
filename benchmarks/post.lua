-- wrk script for the Nexus benchmarks: POST a ~400-byte chat completion.
--
--   wrk -t1 -c16 -d10s --latency -s benchmarks/post.lua http://127.0.0.1:8000/v1/chat/completions
--
-- Environment knobs (all optional):
--   NEXUS_BENCH_MODELS  comma-separated model names; with more than one, requests
--                       rotate through them (default "bench-model")
--   NEXUS_BENCH_STREAM  "1" sends "stream": true
--   NEXUS_BENCH_ENDPOINT "embeddings" posts an embeddings body (two ~60-character inputs)
--   NEXUS_BENCH_PAUSE_MS each connection waits this long after an answer before its next
--                       request (a client that reads the answer first); default 0
-- At the end it prints one line "NEXUS_WRK {json}" with exact figures (latency in
-- microseconds) for benchmarks/run.py; the usual wrk report is printed as well.

local models = {}
for name in string.gmatch(os.getenv("NEXUS_BENCH_MODELS") or "bench-model", "[^,]+") do
  models[#models + 1] = name
end
local stream = os.getenv("NEXUS_BENCH_STREAM") == "1"
local embeddings = os.getenv("NEXUS_BENCH_ENDPOINT") == "embeddings"
local pause_ms = tonumber(os.getenv("NEXUS_BENCH_PAUSE_MS") or "0") or 0

local function body(model)
  if embeddings then
    return '{"model": "' .. model .. '", "input": ['
      .. '"Why does an HTTP proxy keep persistent upstream connections?", '
      .. '"A pool of connections saves a TCP handshake on every request."]}'
  end
  return '{"model": "' .. model .. '", "messages": ['
    .. '{"role": "system", "content": "You are a concise assistant for the platform team; answer plainly."}, '
    .. '{"role": "user", "content": "Summarise why an HTTP proxy keeps a pool of persistent '
    .. 'connections to its upstream servers, in two short sentences for a new engineer."}], '
    .. '"temperature": 0.7, "max_tokens": 128, "top_p": 0.95, "user": "nexus-bench", '
    .. '"stream": ' .. tostring(stream) .. '}'
end

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = body(models[1])

if #models > 1 then
  local requests = {}
  for i, model in ipairs(models) do
    requests[i] = wrk.format(nil, nil, nil, body(model))
  end
  local n = 0
  -- Defined only when rotating: without it wrk sends one prebuilt request (cheaper).
  function request()
    n = n % #requests + 1
    return requests[n]
  end
end

if pause_ms > 0 then
  -- Defined only when pausing: wrk then schedules each next request on a timer.
  function delay()
    return pause_ms
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'NEXUS_WRK {"requests": %d, "duration_us": %d, "bytes": %d, '
    .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f, '
    .. '"connect_errors": %d, "read_errors": %d, "write_errors": %d, '
    .. '"status_errors": %d, "timeouts": %d}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
