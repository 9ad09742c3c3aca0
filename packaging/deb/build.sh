#!/usr/bin/env bash
# Builds gatewayd_<version>_<arch>.deb in dist/ (or OUTPUT_DIRECTORY) and prints its path.
# Usage: packaging/deb/build.sh [OUTPUT_DIRECTORY]
#
# The package carries its own virtualenv in /opt/gatewayd, made with Debian's python3.11:
# our pinned libraries (pyroute2 0.9.7; Debian 12 has 0.7) are inside the .deb, a gateway
# needs no network to install it, and Debian's Python packages never change under us.
# Needs: python3.11 with venv, gcc and libsystemd-dev (systemd-python is compiled), dpkg-deb,
# binutils (strip), and PyPI for the locked files at build time.
#
# Reproducible: only the files of the hashed lock files (packaging/deb/*.lock, written by
# lock.sh) are installed, every time stamp is the changelog's, and no byte code is shipped
# (postinst compiles it), so two builds of one commit hold the same files (same md5sums).
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=/usr/bin/python3.11   # Debian 12's python3; the venv and its C extensions are tied to it
PREFIX=/opt/gatewayd
SITE=$PREFIX/lib/python3.11/site-packages
DEB=packaging/deb
# Installed with the kubernetes client but never imported by gatewayd: its asyncio API
# (kubernetes.aio, 68 MB) and the aiohttp stack under it. build.sh imports every gatewayd
# module afterwards, so a pruned library that is needed after all fails the build.
UNUSED_DISTRIBUTIONS=(aiohttp aiohttp-retry aiohappyeyeballs aiosignal attrs frozenlist
                      multidict propcache yarl)

# The Debian version, the maintainer and the time stamp of every file: the changelog's top entry.
deb_version=$(dpkg-parsechangelog -l "$DEB/changelog" -S Version)
maintainer=$(dpkg-parsechangelog -l "$DEB/changelog" -S Maintainer)
SOURCE_DATE_EPOCH=$(dpkg-parsechangelog -l "$DEB/changelog" -S Timestamp)
export SOURCE_DATE_EPOCH
version=$("$PYTHON" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
if [ "${deb_version%-*}" != "$version" ]; then
    echo "$DEB/changelog: version $deb_version is not pyproject.toml's $version (add an entry)" >&2
    exit 1
fi
arch=$(dpkg --print-architecture)
name="gatewayd_${deb_version}_${arch}"
output=$(realpath -m "${1:-dist}")
mkdir -p build/deb "$output"
# A directory of its own: two builds at once (scripts/build-image, the tests) do not meet.
stage=$(mktemp -d "$PWD/build/deb/$name.XXXXXX")
trap 'rm -rf "$stage" "$stage.src"' EXIT
chmod 0755 "$stage"

# systemd-python is compiled with Debian's hardening flags and no debug information: its
# build directory is a random one, and the debug paths would change the build ID.
CFLAGS="$(dpkg-buildflags --get CFLAGS) -g0"
CPPFLAGS=$(dpkg-buildflags --get CPPFLAGS)
LDFLAGS=$(dpkg-buildflags --get LDFLAGS)
export CFLAGS CPPFLAGS LDFLAGS

"$PYTHON" -m venv "$stage$PREFIX"
pip=("$stage$PREFIX/bin/pip" --quiet --disable-pip-version-check --no-cache-dir)
# The build backends first (systemd-python is an sdist and compiled here), then the locked
# libraries (systemd-python too: the package sends structured records to the journal), then
# gatewayd itself, which has no hash: it is this tree.
"${pip[@]}" install --require-hashes --no-deps -r "$DEB/build-requirements.lock"
"${pip[@]}" install --require-hashes --no-deps --no-compile --no-build-isolation \
    -r "$DEB/requirements.lock"
# From a copy: setuptools builds in the source tree, and two builds at once would share it.
mkdir "$stage.src"
tar -c --exclude=__pycache__ pyproject.toml README.md gatewayd | tar -x -C "$stage.src"
"${pip[@]}" install --no-deps --no-compile --no-build-isolation "$stage.src"
"${pip[@]}" uninstall --yes "${UNUSED_DISTRIBUTIONS[@]}" pip setuptools wheel packaging
rm -rf "$stage$PREFIX"/bin/[Aa]ctivate* "$stage$PREFIX/include"
# Console scripts of the libraries (normalizer, wsdump, ...): only ours are commands here.
find "$stage$PREFIX/bin" -type f ! -name gatewayd ! -name gatewayctl -delete
rm -rf "$stage$SITE/kubernetes/aio"
find "$stage$SITE" -depth -type d \( -name tests -o -name test -o -name __pycache__ \) \
    -exec rm -rf {} +
# Written by pip: the build's own path and nothing a user needs.
rm -f "$stage$SITE"/gatewayd-*.dist-info/direct_url.json
# Like dh_strip: no symbols or build notes in the C extensions.
find "$stage$PREFIX" -name '*.so' -type f -exec \
    strip --strip-unneeded --remove-section=.comment --remove-section=.note {} +

# The venv was made at the staging path; scripts must name the installed one.
sed -i "s|$stage||g" "$stage$PREFIX/pyvenv.cfg"
for script in "$stage$PREFIX"/bin/*; do
    if [ -f "$script" ] && [ ! -L "$script" ] && head -c2 "$script" | grep -q '^#!'; then
        # A staging path too long for a #! line gets pip's /bin/sh trampoline (lines 2-3).
        if sed -n 2p "$script" | grep -q "^'''exec' "; then
            sed -i 2,3d "$script"
        fi
        sed -i "1s|^#!.*|#!$PREFIX/bin/python3.11|" "$script"
    fi
done
# Each distribution's RECORD lists what is installed as it is now: the pruned files gone, the
# scripts with their new #! line (pip wrote the staging path into them, and their hashes).
"$PYTHON" - "$stage$SITE" <<'PY'
import base64, csv, hashlib, io, os, sys

site = sys.argv[1]
for info in os.listdir(site):
    record = os.path.join(site, info, "RECORD")
    if not info.endswith(".dist-info") or not os.path.exists(record):
        continue
    rows = []
    with open(record, newline="") as f:
        for name, digest, size in csv.reader(f):
            path = os.path.normpath(os.path.join(site, name))
            if not os.path.lexists(path):
                continue
            if digest and os.path.isfile(path):
                data = open(path, "rb").read()
                sha = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
                digest, size = f"sha256={sha.decode()}", str(len(data))
            rows.append((name, digest, size))
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    with open(record, "w") as f:
        f.write(out.getvalue())
PY
if grep -rlI -- "$stage" "$stage$PREFIX"; then
    echo "$DEB/build.sh: the files above still name the staging directory" >&2
    exit 1
fi
# Every module of gatewayd still imports (nothing it needs was pruned); byte code is not kept.
PYTHONDONTWRITEBYTECODE=1 "$stage$PREFIX/bin/python3.11" -c '
import importlib, pkgutil, gatewayd
for module in pkgutil.walk_packages(gatewayd.__path__, "gatewayd."):
    importlib.import_module(module.name)
import systemd.journal, kubernetes.client, kubernetes.config, kubernetes.watch
'
# Every library shipped has its paragraph in the copyright file.
for entry in "$stage$SITE"/*; do
    entry=${entry##*/}
    case "$entry" in *.dist-info|*.pth|_distutils_hack|gatewayd) continue ;; esac
    if ! grep -q -- "site-packages/$entry\b" "$DEB/copyright"; then
        echo "$DEB/copyright: no Files paragraph for $SITE/$entry" >&2
        exit 1
    fi
done

install -d -m 0755 "$stage/usr/bin" "$stage/lib/systemd/system" "$stage/usr/share/doc/gatewayd" \
    "$stage/usr/share/man/man8" "$stage/usr/share/lintian/overrides" \
    "$stage/usr/lib/sysusers.d" "$stage/usr/lib/tmpfiles.d" \
    "$stage/usr/share/bash-completion/completions"
ln -s "$PREFIX/bin/gatewayd" "$stage/usr/bin/gatewayd"
ln -s "$PREFIX/bin/gatewayctl" "$stage/usr/bin/gatewayctl"
for program in gatewayd gatewayctl; do
    PYTHONDONTWRITEBYTECODE=1 "$stage$PREFIX/bin/python3.11" -m gatewayd.cli.manpage "$program" \
        | gzip -9n > "$stage/usr/share/man/man8/$program.8.gz"
    # Bash completion, generated from the same parsers.
    PYTHONDONTWRITEBYTECODE=1 "$stage$PREFIX/bin/python3.11" -m gatewayd.cli.gatewayctl \
        completion bash "$program" > "$stage/usr/share/bash-completion/completions/$program"
    chmod 0644 "$stage/usr/share/bash-completion/completions/$program"
done
install -m 0644 systemd/gatewayd.service "$stage/lib/systemd/system/gatewayd.service"
install -m 0644 systemd/gatewayd.sysusers "$stage/usr/lib/sysusers.d/gatewayd.conf"
install -m 0644 systemd/gatewayd.tmpfiles "$stage/usr/lib/tmpfiles.d/gatewayd.conf"
# Config and policies: root's, readable by group gatewayd (postinst sets the group; the
# setgid bit gives new files there the same group).
install -d -m 2750 "$stage/etc/gatewayd" "$stage/etc/gatewayd/snapshot"
install -m 0640 "$DEB/gatewayd.yaml" "$stage/etc/gatewayd/gatewayd.yaml"
install -m 0644 "$DEB/copyright" "$stage/usr/share/doc/gatewayd/copyright"
gzip -9n < "$DEB/changelog" > "$stage/usr/share/doc/gatewayd/changelog.Debian.gz"
chmod 0644 "$stage/usr/share/doc/gatewayd/changelog.Debian.gz" "$stage"/usr/share/man/man8/*
gzip -9n < README.md > "$stage/usr/share/doc/gatewayd/README.md.gz"
chmod 0644 "$stage/usr/share/doc/gatewayd/README.md.gz"
install -m 0644 "$DEB/lintian-overrides" "$stage/usr/share/lintian/overrides/gatewayd"

install -d -m 0755 "$stage/DEBIAN"
for script in postinst prerm postrm; do
    install -m 0755 "$DEB/$script" "$stage/DEBIAN/$script"
done
echo /etc/gatewayd/gatewayd.yaml > "$stage/DEBIAN/conffiles"
sed -e "s/@VERSION@/$deb_version/" -e "s/@ARCH@/$arch/" -e "s/@MAINTAINER@/$maintainer/" \
    -e "s/@INSTALLED_SIZE@/$(du -sk --apparent-size --exclude=DEBIAN "$stage" | cut -f1)/" \
    "$DEB/control.in" > "$stage/DEBIAN/control"
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z \
    | xargs -0 md5sum > DEBIAN/md5sums)
chmod 0644 "$stage/DEBIAN/md5sums" "$stage/DEBIAN/control" "$stage/DEBIAN/conffiles"
find "$stage" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

dpkg-deb --build --root-owner-group -Zxz -z3 "$stage" "$output/$name.deb" >/dev/null
rm -rf "$stage" "$stage.src"
echo "$output/$name.deb"
