#!/bin/sh
# Sets up the platform image from inside its root filesystem, as root. Both recipes run it:
# `hack/image build platform` through chroot (over an mmdebstrap root filesystem), the Dockerfile
# through RUN (over debian:bookworm-slim), each after installing packages.txt. This directory is
# mounted read-only beside it, at /mnt/recipe in both.
#
#   setup.sh base            the user and group, an empty venv, no apt lists, caches or docs
#   setup.sh deps WHEELS     install requirements.txt into the venv from WHEELS (no index)
#   setup.sh project WHEELS  install the project's wheel from WHEELS (no dependencies), then check
#
# WHEELS also holds the pip wheel pinned by pip.txt; pip runs from that wheel and is never
# installed, so the venv holds exactly requirements.txt plus capacity-platform.
set -eu

recipe=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=image.conf
. "$recipe/image.conf"

pip_in_venv() {
  # the one pip wheel in WHEELS, run with the venv's interpreter (a wheel is importable as a zip)
  whl=$(find "$wheels" -maxdepth 1 -name 'pip-*-py3-none-any.whl' | head -n 1)
  [ -n "$whl" ] || { echo "setup.sh: no pip wheel in $wheels" >&2; exit 1; }
  "$IMAGE_VENV/bin/python" "$whl/pip" --disable-pip-version-check --no-cache-dir "$@"
}

install_opts="--quiet --no-index --no-warn-script-location --root-user-action=ignore --find-links"

case ${1:-} in
  base)
    if ! getent group "$IMAGE_USER" >/dev/null; then
      groupadd --gid "$IMAGE_UID" "$IMAGE_USER"
    fi
    if ! getent passwd "$IMAGE_USER" >/dev/null; then
      useradd --uid "$IMAGE_UID" --gid "$IMAGE_UID" --home-dir "$IMAGE_HOME" --create-home \
        --shell /usr/sbin/nologin --no-log-init "$IMAGE_USER"
    fi
    [ -x "$IMAGE_VENV/bin/python" ] || python3 -m venv --without-pip "$IMAGE_VENV"
    # what a running container never needs (dpkg's path-exclude keeps later installs docless too)
    rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/cache/debconf/*-old /var/lib/dpkg/*-old \
      /usr/share/man/* /usr/share/info/* /usr/share/groff/* /usr/share/lintian/* \
      /usr/share/linda/* /usr/share/locale/*
    find /usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete
    find /usr/share/doc -mindepth 1 -type d -empty -delete
    find /var/log -type f -delete
    ;;
  deps)
    wheels=${2:?usage: setup.sh deps WHEELS}
    # shellcheck disable=SC2086 # install_opts is a list of words
    pip_in_venv install $install_opts "$wheels" --requirement "$recipe/requirements.txt"
    ;;
  project)
    wheels=${2:?usage: setup.sh project WHEELS}
    set -- "$wheels"/capacity_platform-*.whl
    if [ $# -ne 1 ] || [ ! -f "$1" ]; then
      echo "setup.sh: want one project wheel in $wheels" >&2
      exit 1
    fi
    # shellcheck disable=SC2086
    pip_in_venv install $install_opts "$wheels" --no-deps "$1"
    pip_in_venv check
    for script in capctl capacity-operator capacity-agent; do
      [ -x "$IMAGE_VENV/bin/$script" ] || { echo "setup.sh: $script missing" >&2; exit 1; }
    done
    ;;
  *)
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
