// keytap Go TLS secrets: an entry uprobe on crypto/tls.(*Config).writeKeyLog.
//
// Go's crypto/tls calls writeKeyLog(label string, clientRandom, secret []byte) once per secret
// of every handshake, whether or not a KeyLogWriter is set, so the arguments alone are the
// key-log line. Only an entry probe: a return probe rewrites the return address on the stack,
// which breaks Go programs when the runtime moves or unwinds that stack.
//
// Arguments (amd64): from Go 1.17 in registers (ABIInternal: RAX = receiver, RBX/RCX = label
// ptr/len, RDI/RSI/R8 = clientRandom ptr/len/cap, R9/R10/R11 = secret ptr/len/cap); before
// that on the stack, 8 bytes each from SP+8 in the same order. Each uprobe's cookie is its
// build's number, so each event names its build; `build_enabled` switches one off.
//
// The return address (at SP on entry) goes up too: user space finds in the binary's function
// table whether the caller is crypto/tls's client or server handshake.
//
// Scope: as bpf/tls.c, only processes whose network namespace is in `scope_netns`.
// Sizes shared with user space come in as -D defines from keytap/kernel/abi.py.
#include <uapi/linux/ptrace.h>
#include "read_user.h"

#if !defined(GO_BUILDS) || !defined(GO_LABEL_SIZE) || !defined(GO_SECRET_SIZE) || !defined(RANDOM_SIZE)
#error "compile through keytap.kernel.abi.go_tls_defines()"
#endif

struct go_secret_event {
    u64 ktime_ns;
    u64 function_address;  // where the probe hit, in the process: gives the load address
    u64 return_address;
    u32 tgid;
    u32 build;
    u32 label_len;
    u32 secret_len;
    u8 label[GO_LABEL_SIZE];
    u8 client_random[RANDOM_SIZE];
    u8 secret[GO_SECRET_SIZE];
    char comm[16];  // the process's command (TASK_COMM_LEN), for the packet comment
};

// Per build, for user space's summary.
enum go_counter { GO_IMPLAUSIBLE, GO_RING_FULL, GO_COUNTERS };

BPF_ARRAY(build_enabled, u8, GO_BUILDS);
BPF_PERCPU_ARRAY(go_counters, u64, GO_COUNTERS * GO_BUILDS);
BPF_RINGBUF_OUTPUT(go_secrets, 64);
BPF_HASH(scope_netns, u32, u8, 1024);

#include "scope.h"

static __always_inline int on_key_log(struct pt_regs *ctx, u32 build, u64 label, u64 label_len,
                                      u64 random, u64 random_len, u64 secret, u64 secret_len)
{
    u8 *enabled = build_enabled.lookup(&build);
    if (!enabled || !*enabled)
        return 0;
#ifndef SCOPE_ALL_PROCESSES
    u32 netns = current_netns();
    if (!scope_netns.lookup(&netns))
        return 0;
#endif
    if (label_len > GO_LABEL_SIZE || random_len != RANDOM_SIZE || !secret_len
        || secret_len > GO_SECRET_SIZE) {
        go_counters.increment(build * GO_COUNTERS + GO_IMPLAUSIBLE);
        return 0;
    }
    struct go_secret_event *event = go_secrets.ringbuf_reserve(sizeof(struct go_secret_event));
    if (!event) {
        go_counters.increment(build * GO_COUNTERS + GO_RING_FULL);
        return 0;
    }
    __builtin_memset(event, 0, sizeof(*event));
    event->ktime_ns = bpf_ktime_get_ns();
    event->function_address = PT_REGS_IP(ctx);
    read_user(&event->return_address, sizeof(u64), (void *)PT_REGS_SP(ctx));
    event->tgid = bpf_get_current_pid_tgid() >> 32;
    bpf_get_current_comm(event->comm, sizeof(event->comm));
    event->build = build;
    event->label_len = label_len;
    event->secret_len = secret_len;
    read_user(event->label, label_len, (void *)label);
    read_user(event->client_random, RANDOM_SIZE, (void *)random);
    read_user(event->secret, secret_len, (void *)secret);
    go_secrets.ringbuf_submit(event, BPF_RB_NO_WAKEUP);  // polled every loop: a wakeup is a self-IPI
    return 0;
}

static __always_inline u64 stack_word(struct pt_regs *ctx, int index)
{
    u64 value = 0;
    read_user(&value, sizeof(value), (char *)PT_REGS_SP(ctx) + 8 * index);
    return value;
}

// The build is the link's cookie (keytap.kernel.uprobes): one program for every binary.
int go_key_log_registers(struct pt_regs *ctx)
{
    return on_key_log(ctx, bpf_get_attach_cookie(ctx), ctx->bx, ctx->cx, ctx->di, ctx->si,
                      ctx->r9, ctx->r10);
}

int go_key_log_stack(struct pt_regs *ctx)
{
    return on_key_log(ctx, bpf_get_attach_cookie(ctx), stack_word(ctx, 2), stack_word(ctx, 3),
                      stack_word(ctx, 4), stack_word(ctx, 5), stack_word(ctx, 7),
                      stack_word(ctx, 8));
}
