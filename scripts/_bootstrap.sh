# Sourced by scripts/test and scripts/dev: cd to the repo root and make sure .venv holds
# pullwake[dev,embedded]; reinstalls only when pyproject.toml changed since the last install.

cd "$(dirname "${BASH_SOURCE[0]}")/.."

find_python() {
  local candidate
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "error: pullwake needs Python >= 3.11 (tried python3.13, 3.12, 3.11, python3)" >&2
  return 1
}

if [[ ! -x .venv/bin/python ]]; then
  python=$(find_python)
  echo "== creating .venv with $python ($("$python" --version))"
  "$python" -m venv .venv
fi

stamp=.venv/.pullwake-install-stamp
pyproject_hash=$(.venv/bin/python -c \
  'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')
if [[ "$(cat "$stamp" 2>/dev/null)" != "$pyproject_hash" ]]; then
  echo "== installing pullwake[dev,embedded] into .venv"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[dev,embedded]'
  echo "$pyproject_hash" >"$stamp"
fi
