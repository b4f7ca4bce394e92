#!/usr/bin/env bash
# Build the voice-appliance .deb (dh-virtualenv) from the working tree and run lintian on it.
#
#   packaging/build-deb.sh [OUT_DIR]     (make deb; OUT_DIR defaults to packaging/dist)
#
# The tree is staged into a scratch directory (tracked and untracked-but-not-ignored files only, so a
# developer's .venv or caches never end up in the package), packaging/debian and the systemd unit are
# put in place there, and dpkg-buildpackage runs unsigned. Prints the path of the built .deb last.
# LINTIAN=0 skips lintian; otherwise any lintian error or warning fails the build.
set -euo pipefail

# Everything runs inside main() so bash parses the whole script before running it (safe to edit mid-build).
main() {
	here="$(cd "$(dirname "$0")" && pwd)"
	repo="$(cd "$here/.." && pwd)"
	out="${1:-$here/dist}"
	mkdir -p "$out"
	out="$(cd "$out" && pwd)"
	work="$(mktemp -d "${TMPDIR:-/tmp}/va-deb.XXXXXX")"
	trap 'rm -rf "$work"' EXIT

	version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/pyproject.toml" | head -1)"
	deb_version="$(dpkg-parsechangelog -l "$here/debian/changelog" -S Version)"
	if [ "${deb_version%-*}" != "$version" ]; then
		echo "build-deb: pyproject version $version != debian/changelog $deb_version" >&2
		exit 1
	fi

	src="$work/voice-appliance-$version"
	mkdir -p "$src"
	(cd "$repo" && git ls-files -z --cached --others --exclude-standard -- \
		pyproject.toml README.md appliance workers shm bench docs/operations.md docs/architecture.md packaging systemd \
		| while IFS= read -r -d '' f; do [ ! -e "$f" ] || printf '%s\0' "$f"; done \
		| xargs -0 cp --parents -t "$src")
	cp -r "$here/debian" "$src/debian"
	cp "$repo/systemd/voice-appliance.service" "$src/debian/voice-appliance.service"
	cp "$repo/systemd/voice-appliance-emulator.service" "$src/debian/voice-appliance.voice-appliance-emulator.service"
	cp "$repo/systemd/voice-appliance-purge.service" "$src/debian/voice-appliance.voice-appliance-purge.service"
	cp "$repo/systemd/voice-appliance-purge.timer" "$src/debian/voice-appliance.voice-appliance-purge.timer"

	(cd "$src" && dpkg-buildpackage -us -uc -b --no-sign >"$work/build.log" 2>&1) || {
		tail -60 "$work/build.log" >&2
		exit 1
	}
	deb="$(ls "$work"/voice-appliance_*.deb)"
	cp "$deb" "$out/"
	if [ "${LINTIAN:-1}" != 0 ]; then
		# Overrides (debian/voice-appliance.lintian-overrides) each carry their reason.
		status=0
		lintian --fail-on error,warning "$deb" >"$out/lintian.txt" 2>&1 || status=$?
		cat "$out/lintian.txt" >&2
		if [ "$status" != 0 ]; then
			echo "build-deb: lintian found errors or warnings" >&2
			exit 1
		fi
	fi
	echo "$out/$(basename "$deb")"
}

main "$@"
