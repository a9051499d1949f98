#!/usr/bin/env bash
# Builds the container image from deploy/Dockerfile, UNCHANGED, with the release binary, runs
# it, and checks what Kubernetes will see. No daemon, no registry, no network beyond Debian's
# archive: Debian's buildah (storage driver vfs, chroot isolation) does the build on a fresh
# Debian 12 machine as root, and installs itself (buildah, oci-image-tool) on first run.
#
#   - the release binary: cargo build --locked --release --bin sandbox-reconciler (incremental;
#     8-14 minutes from scratch on 2 shared cores, about 2.5 minutes when only the crate changed)
#   - the runtime base gcr.io/distroless/cc-debian12:nonroot cannot be pulled here: it is
#     rebuilt from the Debian 12 packages distroless is made of (base-files, netbase, tzdata,
#     ca-certificates, libc6, libgcc-s1, libgomp1, libstdc++6, libssl3; users root, nobody and
#     nonroot 65532; no shell) and tagged with the name the Dockerfile expects. It is cached in
#     target/image-test/storage and rebuilt when one of those packages changes version.
#   - the builder stage is replaced by a build context holding the host-built binary
#     (--build-context builder=DIR), so the image's binary is the one the test suite tested;
#     the multi-stage build from source stays the Dockerfile's default for Docker users.
#   - checks: the image runs (--version, --print-metrics equal the host binary's), user
#     65532:65532, no shell anywhere, the CA bundle, the default configuration, entrypoint,
#     port, and the OCI labels source, revision (= git HEAD) and version (= Cargo.toml)
#   - the image is pushed to an OCI layout (target/image-test/oci, tag VERSION) and validated
#     with oci-image-tool. From there: `skopeo copy oci:target/image-test/oci:0.1.0 docker://...`
#
# Usage: scripts/image-test.sh
# Fails loudly on any missing tool or check (never skips); SANDBOX_RECONCILER_REQUIRE_TOOLS
# changes nothing here because nothing here is optional.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

case "${1:-}" in
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "image-test: unknown argument: $1 (see --help)" >&2; exit 2 ;;
esac

say() { printf 'image-test: %s\n' "$*"; }
die() { printf '\nimage-test: FATAL: %s\n' "$*" >&2; exit 1; }
elapsed() { echo "$(( $(date +%s) - started ))s"; }
started=$(date +%s)

# The runtime base as the Dockerfile names it, and the packages distroless/cc is made of.
BASE_IMAGE="gcr.io/distroless/cc-debian12:nonroot"
BASE_PACKAGES=(base-files netbase tzdata ca-certificates libc6 libgcc-s1 libgomp1 libstdc++6 libssl3)
NONROOT_UID=65532

WORKDIR="$ROOT/target/image-test"
STORAGE=(--root "$WORKDIR/storage" --runroot "$WORKDIR/run" --storage-driver vfs)
mkdir -p "$WORKDIR"

# ----------------------------------------------------------------------------------------
# Tools
# ----------------------------------------------------------------------------------------
[[ "$(id -u)" == 0 ]] || die "needs root (buildah with chroot isolation and vfs storage)"
command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this script needs Debian 12 (bookworm)"
export DEBIAN_FRONTEND=noninteractive
apt_lists_ready() { [[ "$(apt-cache policy libc6 2>/dev/null | awk '/Candidate:/ {print $2}')" =~ ^[0-9] ]]; }
if ! apt_lists_ready; then
  say "apt-get update"
  apt-get update -qq || die "apt-get update failed"
fi
need=()
command -v buildah >/dev/null 2>&1 || need+=(buildah)
command -v oci-image-tool >/dev/null 2>&1 || need+=(oci-image-tool)
if [[ ${#need[@]} -gt 0 ]]; then
  say "installing the Debian packages ${need[*]}"
  log="$(mktemp)"
  apt-get install -y -qq --no-install-recommends "${need[@]}" >"$log" 2>&1 \
    || { cat "$log" >&2; die "apt-get install ${need[*]} failed"; }
  rm -f "$log"
fi
command -v buildah >/dev/null 2>&1 || die "buildah still not found"
command -v oci-image-tool >/dev/null 2>&1 || die "oci-image-tool still not found"
bah() { buildah "${STORAGE[@]}" "$@"; }
say "$(buildah --version) (storage vfs in $WORKDIR/storage), $(oci-image-tool --version 2>&1 | head -n 1)"

# Containers left over by an interrupted run (the images stay: the base is the cache).
cleanup() { bah rm -a >/dev/null 2>&1 || true; [[ -n "${tmp:-}" ]] && rm -rf "$tmp"; }
trap cleanup EXIT
tmp="$(mktemp -d "${TMPDIR:-/tmp}/image-test.XXXXXX")"
bah rm -a >/dev/null 2>&1 || true

# ----------------------------------------------------------------------------------------
# 1. The release binary (the one the image ships)
# ----------------------------------------------------------------------------------------
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
[[ -n "$VERSION" ]] || die "no package version in Cargo.toml"
say "cargo build --locked --release --bin sandbox-reconciler"
nice -n 10 cargo build --locked --release --bin sandbox-reconciler || die "the release build failed"
BINARY="$ROOT/target/release/sandbox-reconciler"
host_version="$("$BINARY" --version)" || die "$BINARY --version failed"
REVISION="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
say "binary: $host_version ($(elapsed))"
[[ "$host_version" == *"$VERSION"* ]] || die "--version ($host_version) does not name the crate version $VERSION"
[[ "$host_version" == *"$REVISION"* ]] \
  || die "--version ($host_version) does not name the revision $REVISION (git HEAD): a stale build?"

# ----------------------------------------------------------------------------------------
# 2. The runtime base, rebuilt from Debian 12's packages (cached by their versions)
# ----------------------------------------------------------------------------------------
base_key="$(apt-cache policy "${BASE_PACKAGES[@]}" | awk '/^[^ ]/ {p=$1} /Candidate:/ {print p, $2}' | tr '\n' ' ')"
base_stamp="$WORKDIR/base.stamp"
if [[ -f "$base_stamp" && "$(cat "$base_stamp")" == "$base_key" ]] \
   && bah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
  say "base $BASE_IMAGE: cached (${BASE_PACKAGES[*]} unchanged)"
else
  say "base $BASE_IMAGE: building from the Debian packages ${BASE_PACKAGES[*]}"
  rootfs="$tmp/base"; mkdir -p "$rootfs" "$tmp/debs"
  (cd "$tmp/debs" && apt-get download -q "${BASE_PACKAGES[@]}" >/dev/null 2>&1) \
    || die "apt-get download ${BASE_PACKAGES[*]} failed"
  for deb in "$tmp"/debs/*.deb; do dpkg-deb -x "$deb" "$rootfs"; done
  # What distroless adds around the packages: the CA bundle (Debian's stock Mozilla set, as
  # update-ca-certificates would write it, not the host's), users, a sticky /tmp, no docs.
  mkdir -p "$rootfs/etc/ssl/certs" "$rootfs/home/nonroot" "$rootfs/tmp" "$rootfs/root"
  cat "$rootfs"/usr/share/ca-certificates/mozilla/*.crt > "$rootfs/etc/ssl/certs/ca-certificates.crt"
  chmod 1777 "$rootfs/tmp"; chmod 0700 "$rootfs/root"
  chown "$NONROOT_UID:$NONROOT_UID" "$rootfs/home/nonroot"
  rm -rf "$rootfs/usr/share/doc" "$rootfs/usr/share/man" "$rootfs/usr/share/info" "$rootfs/usr/share/locale" \
    "$rootfs/usr/share/lintian" "$rootfs/usr/share/ca-certificates"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:%s:%s:nonroot:/home/nonroot:/sbin/nologin\n' \
    "$NONROOT_UID" "$NONROOT_UID" > "$rootfs/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:%s:\n' "$NONROOT_UID" > "$rootfs/etc/group"
  for shell in bin/sh bin/bash bin/dash usr/bin/sh usr/bin/bash usr/bin/dash bin/busybox; do
    [[ ! -e "$rootfs/$shell" ]] || die "the base would contain a shell: /$shell"
  done
  c="$(bah from scratch)"
  m="$(bah mount "$c")"
  cp -a "$rootfs/." "$m/"
  bah umount "$c" >/dev/null
  bah config --user "$NONROOT_UID:$NONROOT_UID" --workingdir /home/nonroot \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt "$c"
  bah commit -q --rm "$c" "$BASE_IMAGE" >/dev/null || die "cannot commit the base image"
  echo "$base_key" > "$base_stamp"
  say "base built ($(elapsed))"
fi

# ----------------------------------------------------------------------------------------
# 3. The project's Dockerfile, unchanged; the builder stage is a directory with the binary
# ----------------------------------------------------------------------------------------
IMAGE="localhost/sandbox-reconciler:$VERSION"
SOURCE="$(sed -n 's/^ARG SOURCE=//p' deploy/Dockerfile)"
mkdir -p "$tmp/prebuilt/out"
install -m 0755 "$BINARY" "$tmp/prebuilt/out/sandbox-reconciler"
bah rmi -f "$IMAGE" >/dev/null 2>&1 || true
say "buildah bud -f deploy/Dockerfile --build-context builder=<binary> --build-arg REVISION=$REVISION"
bah bud -q --pull=never --isolation chroot --layers=false -f deploy/Dockerfile \
  --build-context builder="$tmp/prebuilt" --build-arg REVISION="$REVISION" --build-arg VERSION="$VERSION" \
  -t "$IMAGE" . >"$tmp/bud.log" 2>&1 || { cat "$tmp/bud.log" >&2; die "buildah bud failed"; }
say "image $IMAGE built ($(elapsed))"

# ----------------------------------------------------------------------------------------
# 4. What Kubernetes will see
# ----------------------------------------------------------------------------------------
failures=0
check() { # check DESCRIPTION COMMAND...
  local what="$1"; shift
  if "$@"; then echo "  ok    $what"; else echo "  FAIL  $what"; failures=$((failures + 1)); fi
}
# The image's OCI configuration (buildah inspect prints JSON); cfg KEY prints one field of
# .OCIv1.config as JSON (strings bare), label KEY one label.
bah inspect --type image "$IMAGE" > "$tmp/inspect.json" || die "buildah inspect $IMAGE failed"
cfg() {
  python3 - "$tmp/inspect.json" "$1" <<'PY'
import json, sys
value = json.load(open(sys.argv[1]))["OCIv1"]["config"].get(sys.argv[2])
print(value if isinstance(value, str) else json.dumps(value, sort_keys=True))
PY
}
label() {
  python3 - "$tmp/inspect.json" "$1" <<'PY'
import json, sys
print((json.load(open(sys.argv[1]))["OCIv1"]["config"].get("Labels") or {}).get(sys.argv[2], ""))
PY
}

c="$(bah from --pull=never "$IMAGE")"
m="$(bah mount "$c")"
run() { bah run --isolation chroot "$c" -- "$@"; }

check "user is $NONROOT_UID:$NONROOT_UID (numeric: runAsNonRoot can verify it)" \
  test "$(cfg User)" == "$NONROOT_UID:$NONROOT_UID"
check "entrypoint is the binary" \
  test "$(cfg Entrypoint)" == '["/usr/local/bin/sandbox-reconciler"]'
check "port 9090/tcp exposed" grep -q '"9090/tcp"' <<<"$(cfg ExposedPorts)"
check "SANDBOX_RECONCILER_CONFIG names the default configuration" \
  grep -q '"SANDBOX_RECONCILER_CONFIG=/etc/sandbox-reconciler/default.toml"' <<<"$(cfg Env)"
check "label org.opencontainers.image.version = $VERSION" test "$(label org.opencontainers.image.version)" == "$VERSION"
check "label org.opencontainers.image.revision = $REVISION" test "$(label org.opencontainers.image.revision)" == "$REVISION"
check "label org.opencontainers.image.source = $SOURCE" \
  test -n "$SOURCE" -a "$(label org.opencontainers.image.source)" == "$SOURCE"
no_shell() {
  local s
  for s in bin/sh bin/bash bin/dash bin/ash usr/bin/sh usr/bin/bash usr/bin/dash bin/busybox usr/bin/busybox; do
    if [[ -e "$m/$s" || -L "$m/$s" ]]; then echo "        /$s exists"; return 1; fi
  done
  # And nothing can start one: running /bin/sh in the container fails.
  if run /bin/sh -c true >/dev/null 2>&1; then echo "        /bin/sh ran"; return 1; fi
}
check "no shell (/bin/sh, bash, dash, busybox absent; /bin/sh does not run)" no_shell
ca_bundle() {
  local n
  n="$(grep -c 'BEGIN CERTIFICATE' "$m/etc/ssl/certs/ca-certificates.crt" 2>/dev/null || echo 0)"
  echo "        /etc/ssl/certs/ca-certificates.crt: $n certificates"
  [[ $n -ge 100 ]]
}
check "CA certificates present" ca_bundle
check "/etc/sandbox-reconciler/default.toml is config/default.toml" \
  cmp -s "$m/etc/sandbox-reconciler/default.toml" config/default.toml
check "the binary is the release binary" cmp -s "$m/usr/local/bin/sandbox-reconciler" "$BINARY"
check "/etc/passwd knows nonroot as $NONROOT_UID" grep -q "^nonroot:x:$NONROOT_UID:$NONROOT_UID:" "$m/etc/passwd"
# run_to FILE ARGS...: run in the container, stdout to FILE. Debian's buildah 1.28 now and then
# loses a short-lived process's output under load (exit 0, nothing written): such a run is
# repeated, up to three times, and says so.
run_to() {
  local out="$1" try; shift
  for try in 1 2 3; do
    run "$@" > "$out" || return 1
    [[ -s "$out" ]] && return 0
    echo "        (no output from $*, attempt $try)"
  done
  return 1
}
in_image_version() {
  run_to "$tmp/version-image.txt" /usr/local/bin/sandbox-reconciler --version || return 1
  echo "        $(cat "$tmp/version-image.txt")"
  [[ "$(cat "$tmp/version-image.txt")" == "$host_version" ]]
}
# Running at all proves every shared library the binary links is in the image.
check "--version runs inside the image (as $NONROOT_UID) and names $VERSION and $REVISION" in_image_version
in_image_metrics() {
  run_to "$tmp/metrics-image.txt" /usr/local/bin/sandbox-reconciler --print-metrics || return 1
  "$BINARY" --print-metrics > "$tmp/metrics-host.txt" || return 1
  echo "        $(wc -l < "$tmp/metrics-image.txt") metrics"
  grep -q '^sandbox_reconciler_build_info ' "$tmp/metrics-image.txt" && cmp -s "$tmp/metrics-image.txt" "$tmp/metrics-host.txt"
}
check "--print-metrics runs inside the image and lists the metrics contract" in_image_metrics
bah umount "$c" >/dev/null
bah rm "$c" >/dev/null

# ----------------------------------------------------------------------------------------
# 5. An OCI layout, validated against the image specification
# ----------------------------------------------------------------------------------------
rm -rf "$WORKDIR/oci"
bah push -q "$IMAGE" "oci:$WORKDIR/oci:$VERSION" >/dev/null 2>"$tmp/push.log" \
  || { cat "$tmp/push.log" >&2; die "buildah push to an OCI layout failed"; }
check "OCI layout valid (oci-image-tool validate)" \
  oci-image-tool validate --type image --ref "name=$VERSION" "$WORKDIR/oci"
size="$(du -sh "$WORKDIR/oci" | cut -f1)"

if [[ $failures -gt 0 ]]; then
  die "$failures image check(s) failed"
fi
say "image ok: $IMAGE, user $NONROOT_UID, $size as an OCI layout in target/image-test/oci ($(elapsed))"
