# Sourced by the one-call GPU scripts (bench/*_gpu.sh) after they set B, the seconds the call may use (from
# $BUDGET): installs the carried wheels (.whl/: fla, lark, pydantic, which the device image lacks) into /tmp/site,
# and defines `left DEADLINE` (seconds until min(DEADLINE, B) from the start, at least 1: `timeout 0` would mean no
# limit) and `step NAME` (a progress line with the elapsed seconds). Results go under $OUT.
set -u
OUT=${OUT:-out}
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit
fi
export PYTHONUNBUFFERED=1
T0=$(date +%s)
left() { local d=$(( $1 < B ? $1 : B )); local r=$(( d - ($(date +%s) - T0) )); echo $(( r > 1 ? r : 1 )); }
step() { echo "== $1 at $(( $(date +%s) - T0 )) s"; }
