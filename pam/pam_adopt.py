"""pam_adopt: the file pam_python loads (callerid-adopt's account-phase PAM module).

    -account  required  /lib/security/pam_python.so /opt/callerid-adopt/pam/pam_adopt.py [options]

The module's logic, options and decision order are in pam_adopt_impl.py next to this
file (standard library only, like this one). This file stays tiny because pam_python
compiles it at every login (a fresh interpreter per login, with bytecode writing off):
compiling the whole module costs ~6.5 ms a login, loading it from cached bytecode ~1 ms.
The cache is Python's own (__pycache__/pam_adopt_impl.cpython-3XX.pyc next to the source,
checked against the source's mtime and size, rewritten when stale); it is written by the
first login, as root, into the module's own root-owned directory. Only C-level and
already-loaded modules are used: `importlib.util` alone would cost ~9 ms (and type
annotations are strings: `typing` is not one of them).

Before loading the logic it connects to the agent's default admission socket: on
accept the agent starts switching the kernel's cgroup lock for the coming adoption
(node_agent/agent/warmup.py), so that toll (an RCU grace period, several ms) overlaps with
loading. The logic uses that connection when its `socket=` is the default, and closes
it otherwise. Nothing here can fail a login: an error just means no early connection.
"""

import _frozen_importlib_external as _bootstrap  # the interpreter's own import machinery
import _socket
import sys

DEFAULT_SOCKET = "/run/callerid-adopt/admission.sock"  # = node_agent/pamcontract.py's

_early: "_socket.socket | None" = None
try:
    _early = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    _early.settimeout(0.2)
    _early.connect(DEFAULT_SOCKET)
except OSError:
    if _early is not None:
        _early.close()
    _early = None

_path = __file__.rsplit("/", 1)[0] + "/pam_adopt_impl.py"
sys.dont_write_bytecode = False  # pam_python sets it; this interpreter lives for one login
impl = type(sys)("pam_adopt_impl")
impl.__file__ = _path
_code = _bootstrap.SourceFileLoader("pam_adopt_impl", _path).get_code("pam_adopt_impl")
if _code is None:  # a source file always has code: None would be a loader without source
    raise ImportError(f"no code in {_path}")
exec(_code, impl.__dict__)
if _early is not None:
    impl.__dict__["EARLY"] = (DEFAULT_SOCKET, _early)

pam_sm_acct_mgmt = impl.pam_sm_acct_mgmt
pam_sm_authenticate = impl.pam_sm_authenticate
pam_sm_setcred = impl.pam_sm_setcred
pam_sm_open_session = impl.pam_sm_open_session
pam_sm_close_session = impl.pam_sm_close_session
pam_sm_chauthtok = impl.pam_sm_chauthtok
