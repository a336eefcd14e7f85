#!/usr/bin/env bash
# Measures how many pipeline files kiln lists, as a new user would try them:
# `kiln run-job FILE --list --json --all` on each file, in a scratch git
# checkout of the file's project folder. Counts files listed, jobs listed,
# jobs left out (with a reason), clear errors (exit 2 with a message) and
# crashes (any other exit, or a signal). Runs nothing in a VM.
#
#   scripts/pipeline-fidelity.sh [KILN] [DIR...]
#
# KILN defaults to target/debug/kiln; DIRs default to the pipelines corpus
# (pipelines/tests/corpus/{gitlab,gitlab-include,github,fidelity/*}).
# Extra kiln options come from $KILN_LIST_ARGS (e.g. "--source schedule").
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
kiln=${1:-$here/target/debug/kiln}
shift || true
if [ ! -x "$kiln" ]; then
    echo "no kiln binary at $kiln: build it with 'cargo build -p kiln'" >&2
    exit 2
fi
if [ $# -eq 0 ]; then
    c=$here/pipelines/tests/corpus
    set -- "$c/gitlab" "$c/gitlab-include" "$c/github" "$c/fidelity/gitlab" "$c/fidelity/github"
fi
command -v jq >/dev/null || { echo "needs jq" >&2; exit 2; }
# An older kiln (before --list --all/--json) lists one job a line.
json=yes
"$kiln" run-job --help 2>/dev/null | grep -q -- '--all' || json=no

files=0 listed=0 empty=0 jobs=0 left_out=0 errors=0 crashes=0
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# `include: remote`: no network. A kiln that fetches remote includes reads
# them from its cache with --offline; the cache is seeded with the corpus
# mirror (pipelines/tests/corpus/fidelity/remote/HOST/PATH is what
# https://HOST/PATH sends), under kiln's names: sha256 of the URL.
offline=
if "$kiln" run-job --help 2>/dev/null | grep -q -- '--offline'; then
    offline=--offline
    export KILN_CACHE_DIR=$scratch/cache
    mkdir -p "$KILN_CACHE_DIR/remote-includes"
    mirror=$here/pipelines/tests/corpus/fidelity/remote
    if [ -d "$mirror" ]; then
        while IFS= read -r -d '' m; do
            url=https://${m#"$mirror"/}
            sum=$(printf '%s' "$url" | sha256sum | cut -d' ' -f1)
            cp "$m" "$KILN_CACHE_DIR/remote-includes/$sum.yml"
        done < <(find "$mirror" -type f -print0)
    fi
    # `include: project` and `component` through the GitLab API
    # (--gitlab-url): the API's answers are in the corpus mirror
    # pipelines/tests/corpus/fidelity/gitlab-api (PROJECT/-/REF/FILE,
    # PROJECT/-/project.json, PROJECT/-/releases.json), cached under the
    # URLs kiln asks for on https://gitlab.com.
    api=$here/pipelines/tests/corpus/fidelity/gitlab-api
    if "$kiln" run-job --help 2>/dev/null | grep -q -- '--gitlab-url' && [ -d "$api" ]; then
        offline="$offline --gitlab-url https://gitlab.com"
        enc() { jq -rn --arg s "$1" '$s|@uri'; }
        while IFS= read -r -d '' m; do
            rel=${m#"$api"/}
            project=${rel%%/-/*} rest=${rel#*/-/}
            base=https://gitlab.com/api/v4/projects/$(enc "$project")
            case $rest in
                project.json) url=$base ;;
                releases.json) url="$base/releases?per_page=100" ;;
                *) url="$base/repository/files/$(enc "${rest#*/}")/raw?ref=$(enc "${rest%%/*}")" ;;
            esac
            sum=$(printf '%s' "$url" | sha256sum | cut -d' ' -f1)
            cp "$m" "$KILN_CACHE_DIR/remote-includes/$sum.yml"
        done < <(find "$api" -type f -print0)
    fi
fi
for dir in "$@"; do
    # A scratch checkout: the folder's files, committed, origin on gitlab.com.
    work=$scratch/$(basename "$dir")-$files
    mkdir -p "$work"
    cp -r "$dir"/. "$work"/
    (cd "$work" && git init -q -b main && git remote add origin git@gitlab.com:corpus/project.git \
        && git add -A && git -c user.name=corpus -c user.email=corpus@example.org commit -qm corpus) \
        >/dev/null 2>&1
    while IFS= read -r -d '' f; do
        files=$((files + 1))
        if [ $json = yes ]; then
            # shellcheck disable=SC2086
            out=$("$kiln" run-job "$f" --list --json --all $offline ${KILN_LIST_ARGS:-} 2>"$scratch/err")
        else
            # shellcheck disable=SC2086
            out=$("$kiln" run-job "$f" --list $offline ${KILN_LIST_ARGS:-} 2>"$scratch/err")
        fi
        rc=$?
        rel=${f#"$work"/}
        if [ $rc -eq 0 ]; then
            if [ $json = yes ]; then
                n=$(jq '.jobs | length' <<<"$out")
                x=$(jq '.excluded // [] | length' <<<"$out")
            else
                n=$(grep -c . <<<"$out")
                x=0
            fi
            jobs=$((jobs + n))
            left_out=$((left_out + x))
            if [ "$n" -gt 0 ]; then listed=$((listed + 1)); else empty=$((empty + 1)); fi
            printf '%-60s %3d jobs, %3d left out\n' "$rel" "$n" "$x"
        elif [ $rc -eq 2 ] && [ -s "$scratch/err" ]; then
            errors=$((errors + 1))
            printf '%-60s error: %s\n' "$rel" "$(tail -n 1 "$scratch/err" | cut -c1-160)"
        else
            crashes=$((crashes + 1))
            printf '%-60s CRASH (exit %d)\n' "$rel" "$rc"
        fi
    done < <(find "$work" \( -name '*.gitlab-ci.yml' -o -path '*/.github/workflows/*.yml' \) -print0 | sort -z)
done
echo "files=$files listed=$listed empty=$empty jobs=$jobs left_out=$left_out errors=$errors crashes=$crashes"
[ $crashes -eq 0 ]
