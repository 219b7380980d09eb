"""A Cilium-like program on tcx ingress that redirects the pod's IPv4 packets straight to
another interface (bpf_redirect_neigh, as Cilium's host routing does): on clsact, nothing
would ever see them. Run inside the lab's node namespace: foreign_tcx.py DEV TARGET_DEV.
It holds the tcx link until killed and prints "attached" once it is in place.
"""

import sys
import time

from keytap.kernel.headers import configure_bcc_headers

configure_bcc_headers()

from bcc import BPF  # noqa: E402
from pyroute2 import IPRoute  # noqa: E402

from keytap.kernel.tc import Hook, tcx_link  # noqa: E402

SOURCE = """
#include <uapi/linux/if_ether.h>
int cilium_like(struct __sk_buff *skb) {
    if (skb->protocol != bpf_htons(ETH_P_IP))
        return -1;  /* TCX_NEXT: ARP and the rest go on */
    /* the kernel's four arguments (BCC's headers declare three) */
    return ((long (*)(__u32, void *, int, __u64))BPF_FUNC_redirect_neigh)(TARGET, NULL, 0, 0);
}
"""

device, target = sys.argv[1], sys.argv[2]
with IPRoute() as ipr:
    index, target_index = ipr.link_lookup(ifname=device)[0], ipr.link_lookup(ifname=target)[0]
program = BPF(text=SOURCE, cflags=[f"-DTARGET={target_index}"])
link = tcx_link(program.load_func(b"cilium_like", BPF.SCHED_CLS).fd, index, Hook.INGRESS)
print("attached", flush=True)
while True:
    time.sleep(3600)
