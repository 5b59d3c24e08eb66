#!/usr/bin/env bash
# Prints the Debian archive this machine's apt takes SUITE (default bookworm) from, read from
# its own sources (deb822 *.sources, then one-line *.list), so the stand-in images are built
# from the same mirror or proxy the host uses; no archive's address is written in the repo.
# Usage: deploy/apt-archive.sh [SUITE] [APT_DIR]
set -euo pipefail
suite=${1:-bookworm}
apt=${2:-/etc/apt}

shopt -s nullglob
uri=""
sources=("$apt"/sources.list.d/*.sources)
if ((${#sources[@]})); then
  # A stanza's URIs and Suites, in either order; stanzas end at a blank line.
  uri=$(awk -v want="$suite" '
    function done_stanza() { if (hit && u != "") { print u; found = 1; exit } u = ""; hit = 0 }
    /^[ \t]*$/ { done_stanza(); next }
    /^URIs:/ { u = $2 }
    /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == want) hit = 1 }
    END { if (!found && hit && u != "") print u }
  ' "${sources[@]}")
fi
if [ -z "$uri" ]; then
  lists=("$apt"/sources.list "$apt"/sources.list.d/*.list)
  existing=()
  for file in "${lists[@]}"; do [ -f "$file" ] && existing+=("$file"); done
  if ((${#existing[@]})); then
    # deb [options] URI SUITE COMPONENTS...
    uri=$(sed -E 's/\[[^]]*\]//' "${existing[@]}" \
      | awk -v want="$suite" '$1 == "deb" && $3 == want { print $2; exit }')
  fi
fi
[ -n "$uri" ] || { echo "no Debian archive for $suite in $apt's sources" >&2; exit 1; }
echo "$uri"
