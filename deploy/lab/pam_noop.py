"""pam_noop: a pam_python account module that admits everyone and does nothing else.

The lab's `lab-sshd-<node>-noop` service (sshd on port 2202) loads it, so benchmarks can
tell what pam_python itself costs a login (the interpreter starts for every login) apart
from what pam_adopt adds. Standard library only; nothing is imported at all.

    -account  required  /usr/lib/security/pam_python.so <repo>/deploy/lab/pam_noop.py
"""


def pam_sm_acct_mgmt(pamh, flags, argv):
    return pamh.PAM_SUCCESS


def _not_ours(pamh, flags, argv):
    return pamh.PAM_IGNORE


pam_sm_authenticate = _not_ours
pam_sm_setcred = _not_ours
pam_sm_open_session = _not_ours
pam_sm_close_session = _not_ours
pam_sm_chauthtok = _not_ours
