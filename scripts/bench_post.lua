-- wrk script for scripts/bench: POST the same JSON body on every request, then print one JSON
-- line with the counts and the latency percentiles (microseconds).
-- PULLWAKE_BENCH_TOKEN: the API token; PULLWAKE_BENCH_BODY: the body.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("PULLWAKE_BENCH_TOKEN") or "")
wrk.body = os.getenv("PULLWAKE_BENCH_BODY") or '{"payload": {}}'

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "non_2xx": %d, "errors": %d, ' ..
    '"p50_us": %d, "p95_us": %d, "p99_us": %d, "mean_us": %.1f, "max_us": %d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99),
    latency.mean, latency.max))
end
