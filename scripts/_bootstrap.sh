# Sourced by scripts/test, scripts/dev and scripts/bench: cd to the repo root and make sure the
# venv holds pullwake[server,embedded,otel] (editable) and the contributors' tools (pyproject's `dev`
# dependency group, PEP 735: pip 25.1 or later, which the upgrade below brings); reinstalls only
# when pyproject.toml changed since the last install.
# PULLWAKE_VENV names the venv (default .venv). PULLWAKE_PYTHON picks the Python that creates it:
# a command, a path or a version such as 3.13 (pyenv's versions count even when not on PATH).
# Unset, the newest Python 3.11+ on PATH: every dependency, embedded Postgres and Redis included,
# ships wheels for 3.11 to 3.14.

cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv=${PULLWAKE_VENV:-.venv}

python_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }

usable() {  # $1 is Python 3.11+ and, when PULLWAKE_PYTHON is a version, that version
  local version
  version=$(python_version "$1") || return 1
  [[ ! ${PULLWAKE_PYTHON:-} =~ ^3\.[0-9]+$ || $version == "$PULLWAKE_PYTHON" ]] &&
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))'
}

find_python() {
  local wanted=${PULLWAKE_PYTHON:-} candidate
  local candidates=(python3.14 python3.13 python3.12 python3.11 python3)
  if [[ $wanted =~ ^3\.[0-9]+$ ]]; then
    candidates=("python$wanted" "$(pyenv root 2>/dev/null)/versions/$wanted".*/bin/"python$wanted")
  elif [[ -n $wanted ]]; then
    candidates=("$wanted")
  fi
  for candidate in "${candidates[@]}"; do
    if usable "$candidate"; then
      echo "$candidate"
      return 0
    fi
  done
  echo "error: no Python >= 3.11 found (tried: ${candidates[*]}); set PULLWAKE_PYTHON" >&2
  return 1
}

if [[ ! -x $venv/bin/python ]]; then
  python=$(find_python)
  echo "== creating $venv with $python ($("$python" --version))"
  "$python" -m venv "$venv"
elif [[ -n ${PULLWAKE_PYTHON:-} ]]; then
  python=$(find_python)
  have=$(python_version "$venv/bin/python") want=$(python_version "$python")
  if [[ $have != "$want" ]]; then
    echo "error: $venv is Python $have, not $want: remove it or set PULLWAKE_VENV" >&2
    exit 1
  fi
fi

stamp=$venv/.pullwake-install-stamp
pyproject_hash=$("$venv/bin/python" -c \
  'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')
if [[ "$(cat "$stamp" 2>/dev/null)" != "$pyproject_hash" ]]; then
  echo "== installing pullwake[server,embedded,otel] and the dev group into $venv"
  "$venv/bin/python" -m pip install --quiet --upgrade 'pip>=25.1'
  "$venv/bin/python" -m pip install --quiet -e '.[server,embedded,otel]' --group dev
  echo "$pyproject_hash" >"$stamp"
fi
