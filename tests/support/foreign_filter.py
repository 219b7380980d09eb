"""Install a BPF filter that is not keytap's (as Cilium would), for the cleanup tests.

Run as a script inside the lab's node namespace: foreign_filter.py DEV HOOK PRIO.
The program returns TC_ACT_UNSPEC, like Cilium's do for traffic they let through.
"""

import sys

from keytap.kernel.headers import configure_bcc_headers

configure_bcc_headers()

from bcc import BPF  # noqa: E402
from pyroute2 import IPRoute  # noqa: E402

PARENTS = {"ingress": "ffff:fff2", "egress": "ffff:fff3"}

device, hook, prio = sys.argv[1], sys.argv[2], int(sys.argv[3])
program = BPF(text="int foreign(struct __sk_buff *skb) { return -1; }")
function = program.load_func(b"foreign", BPF.SCHED_CLS)
with IPRoute() as ipr:
    index = ipr.link_lookup(ifname=device)[0]
    ipr.tc("add-filter", "bpf", index, ":1", fd=function.fd, name="foreign_cilium",
           parent=PARENTS[hook], classid=1, direct_action=True, prio=prio, protocol=3)
