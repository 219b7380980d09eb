// keytap TC classifier: copy every packet (up to SNAPLEN bytes) to user space, pass it on.
//
// Attached with direct-action on clsact ingress and egress. Returns TC_ACT_UNSPEC so the packet
// continues to the next filter on the hook (Cilium, Calico...) exactly as if keytap were absent.
// Records are sized to the packet: the skb is copied into a per-CPU scratch slot, then
// bpf_ringbuf_output() copies header + captured bytes (bpf_ringbuf_reserve() would need a
// constant size, i.e. 256 KiB of ring for every 60-byte ACK).
// Sizes and the record header are shared with user space: keytap/kernel/abi.py.
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#if !defined(SNAPLEN) || !defined(RING_PAGES) || !defined(POSSIBLE_CPUS)
#error "compile through keytap.kernel.abi.capture_defines()"
#endif

enum direction { DIR_INBOUND = 1, DIR_OUTBOUND = 2 };

struct packet_header {
    u64 ktime_ns;
    u32 ifindex;
    u32 orig_len;
    u32 cap_len;
    u32 direction;
};

struct packet_record {
    struct packet_header header;
    u8 data[SNAPLEN];
};

struct counter_key {
    u32 ifindex;
    u32 direction;
};

struct counters {
    u64 seen;
    u64 dropped;  // ring buffer full, or the copy failed
};

BPF_RINGBUF_OUTPUT(packets, RING_PAGES);
BPF_ARRAY(scratch, struct packet_record, POSSIBLE_CPUS);  // not per-CPU: those values max out at 32 KiB
BPF_PERCPU_HASH(counters, struct counter_key, struct counters, 4096);

static __always_inline int capture(struct __sk_buff *skb, u32 direction)
{
    struct counter_key key = {.ifindex = skb->ifindex, .direction = direction};
    struct counters zero = {};
    struct counters *count = counters.lookup_or_try_init(&key, &zero);
    if (!count)
        return TC_ACT_UNSPEC;
    count->seen++;

    u32 cpu = bpf_get_smp_processor_id();
    struct packet_record *record = scratch.lookup(&cpu);
    if (!record) {
        count->dropped++;
        return TC_ACT_UNSPEC;
    }
    u32 cap_len = skb->len;
    if (cap_len > SNAPLEN)
        cap_len = SNAPLEN;
    record->header.ktime_ns = bpf_ktime_get_ns();
    record->header.ifindex = skb->ifindex;
    record->header.orig_len = skb->len;
    record->header.cap_len = cap_len;
    record->header.direction = direction;
    if (cap_len > 0 && bpf_skb_load_bytes(skb, 0, record->data, cap_len) < 0) {
        count->dropped++;
        return TC_ACT_UNSPEC;
    }
    if (packets.ringbuf_output(record, sizeof(record->header) + cap_len, 0) < 0)
        count->dropped++;
    return TC_ACT_UNSPEC;
}

int keytap_ingress(struct __sk_buff *skb) { return capture(skb, DIR_INBOUND); }
int keytap_egress(struct __sk_buff *skb) { return capture(skb, DIR_OUTBOUND); }
