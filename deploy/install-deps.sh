#!/bin/bash
# Install the Debian packages callerid-adopt, its lab and its tests need.
# Idempotent; run as root. Services that the packages would start (sshd, munged)
# are held back with a temporary policy-rc.d: the lab starts its own, inside
# its own namespaces, and nothing should listen on the machine's network.
set -euo pipefail

PACKAGES=(
    openssh-server openssh-client   # sshd -i for ssh-to-job, the lab's sshd
    libpam-python pamtester         # the PAM module and its fast tests
    munge libmunge2                 # identity on every gRPC call
    iproute2 util-linux procps psmisc  # lab namespaces, veth, nsenter/unshare
    nftables                        # the lab's black-holed ports (lab.blackhole)
    python3-venv python3-dev        # the venv is made from Debian's /usr/bin/python3
    libnss-wrapper tmux rsync       # ssh-to-job: users without passwd entries, tty tests, rsync
)

missing=()
for p in "${PACKAGES[@]}"; do
    [[ $p == \#* ]] && continue
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
    exit 0
fi

echo "install-deps: installing ${missing[*]}"
created_policy=0
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\n# callerid-adopt install-deps: do not start services\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    created_policy=1
fi
trap '[[ $created_policy == 1 ]] && rm -f /usr/sbin/policy-rc.d' EXIT
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
