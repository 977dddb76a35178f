#!/bin/sh
# Initialise a SoftHSM2 token for meshca (development and CI; see hsm/README.md).
#
#   export SOFTHSM2_CONF=/etc/meshca/softhsm2.conf   # from hsm/softhsm2.conf.example
#   export MESHCA_PKCS11_PIN=...      # user PIN: meshca logs in with it
#   export MESHCA_PKCS11_SO_PIN=...   # security officer PIN: only to reset the user PIN
#   hsm/init-softhsm-token.sh [token-label]          # default label: meshca
#
# The PINs come from the environment only and are never printed. softhsm2-util accepts
# them only as arguments (or typed at a terminal), so for the instant it runs they are
# visible in its command line to other users of this machine who can list processes;
# run this on a machine you do not share, or mount /proc with hidepid=2.
set -eu

label=${1:-meshca}

fail() {
    printf 'init-softhsm-token: %s\n' "$*" >&2
    exit 1
}

command -v softhsm2-util >/dev/null 2>&1 ||
    fail "softhsm2-util not found; install SoftHSM2 (Debian/Ubuntu: apt install softhsm2)"

[ -n "${SOFTHSM2_CONF:-}" ] ||
    fail "SOFTHSM2_CONF is not set; copy hsm/softhsm2.conf.example, set its tokendir, and export SOFTHSM2_CONF=<that file> (export SOFTHSM2_CONF=/etc/softhsm/softhsm2.conf to use the system's tokens on purpose)"
[ -r "$SOFTHSM2_CONF" ] || fail "SOFTHSM2_CONF=$SOFTHSM2_CONF is not a readable file"

[ -n "${MESHCA_PKCS11_PIN:-}" ] || fail "MESHCA_PKCS11_PIN is not set; export the token's user PIN (4-255 characters) first"
[ -n "${MESHCA_PKCS11_SO_PIN:-}" ] || fail "MESHCA_PKCS11_SO_PIN is not set; export the token's security officer PIN (4-255 characters) first"
for name in MESHCA_PKCS11_PIN MESHCA_PKCS11_SO_PIN; do
    eval "length=\${#$name}"
    # shellcheck disable=SC2154  # set by eval
    if [ "$length" -lt 4 ] || [ "$length" -gt 255 ]; then
        fail "$name must be 4 to 255 characters long (SoftHSM2's limit); it is $length"
    fi
done
[ "$MESHCA_PKCS11_PIN" != "$MESHCA_PKCS11_SO_PIN" ] ||
    fail "MESHCA_PKCS11_PIN and MESHCA_PKCS11_SO_PIN must differ"

tokendir=$(sed -n 's/^[[:space:]]*directories\.tokendir[[:space:]]*=[[:space:]]*//p' "$SOFTHSM2_CONF" | tail -n 1)
[ -n "$tokendir" ] || fail "$SOFTHSM2_CONF sets no directories.tokendir"
if [ ! -d "$tokendir" ]; then
    (umask 077 && mkdir -p "$tokendir") || fail "cannot create token directory $tokendir"
    echo "Created token directory $tokendir (mode 0700)."
fi

if softhsm2-util --show-slots 2>/dev/null | grep -q "^[[:space:]]*Label:[[:space:]]*$label[[:space:]]*$"; then
    fail "a token labelled '$label' already exists in $tokendir; meshca never re-initialises a token (that would destroy its keys)"
fi

softhsm2-util --init-token --free --label "$label" \
    --pin "$MESHCA_PKCS11_PIN" --so-pin "$MESHCA_PKCS11_SO_PIN" >/dev/null ||
    fail "softhsm2-util could not initialise the token (is $tokendir writable?)"

serial=$(softhsm2-util --show-slots |
    awk -v want="$label" '/Serial number:/ { s = $3 } /^[[:space:]]*Label:/ { sub(/^[[:space:]]*Label:[[:space:]]*/, ""); sub(/[[:space:]]+$/, ""); if ($0 == want) { print s; exit } }')

module=""
for candidate in /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
    /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so /usr/lib64/pkcs11/libsofthsm2.so \
    /usr/local/lib/softhsm/libsofthsm2.so /opt/homebrew/lib/softhsm/libsofthsm2.so; do
    if [ -e "$candidate" ]; then
        module=$candidate
        break
    fi
done

cat <<NEXT
Token '$label' is initialised (serial ${serial:-unknown}) in $tokendir.

Next, create the root key inside the token (the PIN is read from MESHCA_PKCS11_PIN,
already exported in this shell):

  export SOFTHSM2_CONF=$SOFTHSM2_CONF
  export MESHCA_SIGNER__KIND=pkcs11
  export MESHCA_SIGNER__MODULE=${module:-/path/to/libsofthsm2.so}
  export MESHCA_SIGNER__TOKEN_LABEL=$label
  meshca admin root create --signer pkcs11

Then start the CA with the same environment: meshca server
NEXT
