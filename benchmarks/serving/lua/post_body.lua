-- POST one fixed KServe V2 request body, read from a file, on every request; print a JSON summary at the end.
--   wrk -t1 -c32 -d10s -s post_body.lua http://127.0.0.1:PORT/v2/models/NAME/infer -- BODY CONTENT_TYPE [HEADER_LENGTH]
-- BODY is the request written by benchmarks/serving/workloads.py; HEADER_LENGTH, for Triton's binary tensor
-- extension, is the length of the JSON header that precedes the raw tensor bytes. The body is read once, in
-- init, and wrk sends the same pre-formatted request (Content-Length included) on every connection.

local function read_file(path)
   local file = io.open(path, "rb")
   if file == nil then
      error("cannot open request body " .. tostring(path))
   end
   local data = file:read("*a")
   file:close()
   return data
end

function init(args)
   if args[1] == nil or args[2] == nil then
      error("usage: -s post_body.lua URL -- BODY_FILE CONTENT_TYPE [INFERENCE_HEADER_LENGTH]")
   end
   wrk.method = "POST"
   wrk.body = read_file(args[1])
   wrk.headers["Content-Type"] = args[2]
   if args[3] ~= nil then
      wrk.headers["Inference-Header-Content-Length"] = args[3]
   end
end

-- One machine-readable line; the harness reads it instead of scraping wrk's human summary.
function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"errors_connect":%d,"errors_read":%d,' ..
      '"errors_write":%d,"errors_status":%d,"errors_timeout":%d,"latency_p50_us":%d,"latency_p90_us":%d,' ..
      '"latency_p99_us":%d,"latency_p999_us":%d,"latency_mean_us":%.1f,"latency_max_us":%d}\n',
      summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
      latency.mean, latency.max))
end
