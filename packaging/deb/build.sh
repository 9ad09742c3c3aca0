#!/usr/bin/env bash
# Builds dist/gatewayd_<version>_<arch>.deb and prints its path. Usage: packaging/deb/build.sh
#
# The package carries its own virtualenv in /opt/gatewayd, made with Debian's python3.11:
# our pinned libraries (pyroute2 0.9.7; Debian 12 has 0.7) are inside the .deb, a gateway
# needs no network to install it, and Debian's Python packages never change under us.
# Needs: python3.11 with venv, gcc and libsystemd-dev (systemd-python is compiled), dpkg-deb,
# and PyPI for the pinned wheels at build time.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=/usr/bin/python3.11   # Debian 12's python3; the venv and its C extensions are tied to it
PREFIX=/opt/gatewayd
version=$("$PYTHON" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
arch=$(dpkg --print-architecture)
name="gatewayd_${version}_${arch}"
stage="$PWD/build/deb/$name"
rm -rf "$stage"
mkdir -p "$stage" dist

"$PYTHON" -m venv "$stage$PREFIX"
# systemd-python: gatewayd.systemd works without it (socket protocol, stderr), but the package
# always ships the real binding so events reach the journal as structured records.
"$stage$PREFIX/bin/pip" install --quiet --disable-pip-version-check --no-compile --use-pep517 \
    . systemd-python==235
"$stage$PREFIX/bin/pip" uninstall --quiet --yes pip setuptools
rm -f "$stage$PREFIX"/bin/[Aa]ctivate* "$stage$PREFIX"/bin/pip*

# The venv was made at the staging path; scripts must name the installed one.
sed -i "s|$stage||g" "$stage$PREFIX/pyvenv.cfg"
for script in "$stage$PREFIX"/bin/*; do
    if [ -f "$script" ] && [ ! -L "$script" ] && head -c2 "$script" | grep -q '^#!'; then
        sed -i "1s|^#!.*|#!$PREFIX/bin/python3.11|" "$script"
    fi
done
find "$stage$PREFIX" -name __pycache__ -type d -prune -exec rm -rf {} +
# Compiled now, with the installed paths: ProtectSystem=strict keeps the daemon from writing them.
"$PYTHON" -m compileall -q -j0 -s "$stage" -p / "$stage$PREFIX/lib" >/dev/null
if grep -rlI --exclude=direct_url.json -- "$stage" "$stage$PREFIX"; then
    echo "packaging/deb/build.sh: the files above still name the staging directory" >&2
    exit 1
fi

install -d -m 0755 "$stage/usr/bin" "$stage/lib/systemd/system" "$stage/usr/share/doc/gatewayd"
ln -s "$PREFIX/bin/gatewayd" "$stage/usr/bin/gatewayd"
ln -s "$PREFIX/bin/gatewayctl" "$stage/usr/bin/gatewayctl"
install -m 0644 systemd/gatewayd.service "$stage/lib/systemd/system/gatewayd.service"
install -d -m 0755 "$stage/usr/lib/sysusers.d"
install -m 0644 systemd/gatewayd.sysusers "$stage/usr/lib/sysusers.d/gatewayd.conf"
install -d -m 0755 "$stage/usr/lib/tmpfiles.d"
install -m 0644 systemd/gatewayd.tmpfiles "$stage/usr/lib/tmpfiles.d/gatewayd.conf"
# Config and policies: root's, readable by group gatewayd (postinst sets the group; the
# setgid bit gives new files there the same group).
install -d -m 2750 "$stage/etc/gatewayd" "$stage/etc/gatewayd/snapshot"
install -m 0640 packaging/deb/gatewayd.yaml "$stage/etc/gatewayd/gatewayd.yaml"
if [ -f README.md ]; then
    install -m 0644 README.md "$stage/usr/share/doc/gatewayd/README.md"
fi

install -d -m 0755 "$stage/DEBIAN"
for script in postinst prerm postrm; do
    install -m 0755 "packaging/deb/$script" "$stage/DEBIAN/$script"
done
echo /etc/gatewayd/gatewayd.yaml > "$stage/DEBIAN/conffiles"
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" \
    -e "s/@INSTALLED_SIZE@/$(du -sk --exclude=DEBIAN "$stage" | cut -f1)/" \
    packaging/deb/control.in > "$stage/DEBIAN/control"

dpkg-deb --build --root-owner-group -Zxz -z3 "$stage" "dist/$name.deb" >/dev/null
rm -rf "$stage"
echo "$PWD/dist/$name.deb"
