#!/bin/bash
# Install the Debian packages callerid-adopt, its lab and its tests need.
# Idempotent; run as root. Services that the packages would start (sshd, munged,
# slurmctld, slurmd) are held back with a temporary policy-rc.d: the lab starts its
# own, inside its own namespaces, and nothing should listen on the machine's network.
# Debian's slurmctld and slurmd packages also enable their systemd units (they would
# start at the next boot, outside any lab namespace, with the host's /etc/slurm):
# those two units are masked. The lab never uses them; unmask by hand to run Slurm
# on this host for real.
set -euo pipefail

PACKAGES=(
    openssh-server openssh-client   # sshd -i for ssh-to-job, the lab's sshd
    libpam-python pamtester         # the PAM module and its fast tests
    munge libmunge2                 # identity on every gRPC call
    iproute2 util-linux procps psmisc  # lab namespaces, veth, nsenter/unshare
    nftables                        # the lab's black-holed ports (lab.blackhole)
    python3-venv python3-dev        # the venv is made from Debian's /usr/bin/python3
    libnss-wrapper tmux rsync       # ssh-to-job: users without passwd entries, tty tests, rsync
    slurmctld slurmd slurm-client   # real Slurm in the lab (lab.py up --slurm), 22.05 on bookworm
    libpam-slurm-adopt              # pam_slurm_adopt, the module pam_adopt replaces
    ansible-core                    # ssh job.42 with Ansible (its lab test)
)
#: Units of the packages above that must never start on the host (the lab runs its own).
MASKED_UNITS=(slurmctld.service slurmd.service)

mask_units() {
    # --root=/ works whether or not systemd runs (containers): only links in /etc.
    local u
    for u in "${MASKED_UNITS[@]}"; do
        [[ $(systemctl --root=/ is-enabled "$u" 2>/dev/null) == masked ]] && continue
        systemctl --root=/ disable "$u" >/dev/null 2>&1 || true
        systemctl --root=/ mask "$u" >/dev/null
        echo "install-deps: masked $u (the lab starts Slurm inside its namespaces)"
    done
}

missing=()
for p in "${PACKAGES[@]}"; do
    [[ $p == \#* ]] && continue
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
    mask_units
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
mask_units
