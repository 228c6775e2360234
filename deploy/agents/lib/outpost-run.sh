# Sourced by the agent entrypoints (POSIX sh): runs the CLI so that a stop reaches it.
#   outpost_run <output-file> <cli> [arg...]   sets $status to the CLI's exit status
# The CLI's output (stdout and stderr) is the run's live log and is also copied to <output-file>
# (the result's summary). Not a `{ cli; } | tee` pipeline: the executor stops a run (cancel,
# timeout) with SIGTERM to the container's init, which passes it to this shell only; in a
# pipeline the shell died at once and the CLI was killed with the container, without its grace
# period. Here the CLI runs in the background with its output through a FIFO into tee, the shell
# passes SIGTERM on to it and waits: the CLI gets the whole grace period (OUTPOST_STOP_GRACE_MS)
# to stop, its output is kept, and its exit status is the run's (POSIX sh has no pipefail).
outpost_run() {
  _outpost_output=$1
  shift
  _outpost_fifo="${TMPDIR:-/tmp}/outpost-agent-output.$$.fifo"
  _outpost_cli=""
  _outpost_term=""
  # A SIGTERM before the CLI has started is passed on as soon as it has.
  trap '_outpost_term=1; [ -z "$_outpost_cli" ] || kill -TERM "$_outpost_cli" 2>/dev/null || :' TERM
  rm -f "$_outpost_fifo"
  mkfifo "$_outpost_fifo"
  tee "$_outpost_output" <"$_outpost_fifo" &
  _outpost_tee=$!
  "$@" >"$_outpost_fifo" 2>&1 </dev/null &
  _outpost_cli=$!
  [ -z "$_outpost_term" ] || kill -TERM "$_outpost_cli" 2>/dev/null || :
  while :; do
    status=0
    wait "$_outpost_cli" || status=$?
    # A trapped signal ends `wait` early (status > 128) while the CLI still runs: wait again.
    kill -0 "$_outpost_cli" 2>/dev/null || break
  done
  trap - TERM
  wait "$_outpost_tee" || :
  rm -f "$_outpost_fifo"
}
