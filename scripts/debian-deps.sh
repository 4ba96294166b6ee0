#!/usr/bin/env bash
# Install the Debian packages the tests use (network namespaces, nftables, iptables for the fallback, sshd, etcd) when running as root and
# they are missing. A non-root developer gets a message; the tests that need them are skipped with a reason.
set -euo pipefail
need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v nft >/dev/null 2>&1 || need+=(nftables)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v iptables-restore >/dev/null 2>&1 || need+=(iptables)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "debian-deps: not root; missing ${need[*]} (tests that need them will be skipped)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null || true
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || \
  echo "debian-deps: could not install ${need[*]} (tests that need them will be skipped)" >&2
# installing a service package must not leave it running: the tests start their own instances
for svc in ssh etcd; do
  command -v systemctl >/dev/null 2>&1 && systemctl stop "$svc" >/dev/null 2>&1 || true
  command -v service >/dev/null 2>&1 && service "$svc" stop >/dev/null 2>&1 || true
done
exit 0
