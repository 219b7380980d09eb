// Scope of the uprobes (bpf/tls.c, bpf/go_tls.c): only processes whose network namespace is in
// the program's `scope_netns` map (a pod's, not its neighbours'). The kernel struct offsets come
// from the running kernel's BTF (TASK_NSPROXY etc., -D defines), never from the installed
// headers, which may be another version. SCOPE_ALL_PROCESSES: --all-processes.
//
// No map here: BCC rewrites `map.lookup()` only in the main file, so each program declares
// `scope_netns` and looks current_netns() up in it.
#ifndef SCOPE_ALL_PROCESSES
static __always_inline u32 current_netns(void)
{
    char *task = (char *)bpf_get_current_task();
    char *nsproxy = NULL, *net = NULL;
    u32 inum = 0;
    bpf_probe_read_kernel(&nsproxy, sizeof(nsproxy), task + TASK_NSPROXY);
    if (!nsproxy)
        return 0;  // an exiting task
    bpf_probe_read_kernel(&net, sizeof(net), nsproxy + NSPROXY_NET_NS);
    bpf_probe_read_kernel(&inum, sizeof(inum), net + NET_NS_INUM);
    return inum;
}
#endif
