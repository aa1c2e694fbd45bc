-- wrk script: POST /v1/chat/completions with a JSON body; prints one JSON summary line.
-- Usage: wrk -t1 -c32 -d8s -s bench/wrk/chat.lua http://HOST:PORT/v1/chat/completions -- MODE USAGE
--   MODE  = json (default) | stream   ("stream": true, 64 SSE token chunks from the mock)
--   USAGE = 1 (default) | 0           (stream_options.include_usage, stream mode only)
-- The done() hook prints `WRKJSON {...}` (latencies in microseconds) for bench/overhead.py.

local BODY_JSON = '{"model":"mock-model","messages":[{"role":"user","content":"Say hello."}],'
  .. '"max_tokens":16}'
local BODY_STREAM = '{"model":"mock-model","messages":[{"role":"user","content":"Say hello."}],'
  .. '"max_tokens":64,"stream":true%s}'

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "*/*"

function init(args)
  local mode = args[1] or "json"
  local usage = args[2] or "1"
  if mode == "stream" then
    local opts = ""
    if usage == "1" then
      opts = ',"stream_options":{"include_usage":true}'
    end
    wrk.body = string.format(BODY_STREAM, opts)
  else
    wrk.body = BODY_JSON
  end
  -- wrk.init (which called us) formats the request once after this returns.
end

function done(summary, latency, requests)
  local e = summary.errors
  local duration_s = summary.duration / 1e6
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_s":%.6f,"rps":%.3f,"bytes":%d,'
      .. '"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,"max_us":%.1f,"mean_us":%.2f,'
      .. '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
    summary.requests, duration_s, summary.requests / duration_s, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
