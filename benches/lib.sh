# Shared by the benchmark scripts (sourced, not run): waiting for a Zebu
# binary's ready line, and reading addresses from it. The ready lines'
# format is defined once, in proto/src/ready.rs.

# wait_ready PID OUT REGEX LIMIT_S WHAT: returns 0 once the file OUT (the
# process's stdout) has a line matching REGEX; returns 1 after saying why
# (exited, or not ready within LIMIT_S seconds) with the tail of its stderr
# (OUT with .out replaced by .err).
wait_ready() {
  local pid=$1 out=$2 regex=$3 limit=$4 what=$5 i
  for ((i = 0; i < limit * 10; i++)); do
    grep -Eq "$regex" "$out" 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "$what did not become ready within ${limit}s; its stderr:" >&2
  else
    echo "$what exited before it was ready; its stderr:" >&2
  fi
  tail -n 20 "${out%.out}.err" >&2 2>/dev/null || true
  return 1
}

# replica_address OUT: the gRPC address in a replica's ready line in OUT.
replica_address() {
  sed -n 's/^zebu-replica serving .* on \([^ ]*\) (id .*/\1/p' "$1" | head -1
}

# The regexes of the ready lines.
REPLICA_READY='^zebu-replica serving .* on [^ ]+ \(id '
engine_ready() { echo "^zebu-engine volume $1 ready: "; }
