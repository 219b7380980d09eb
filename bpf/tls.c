// keytap TLS secrets: uprobes on OpenSSL read a connection's secrets out of its structs.
//
// Struct offsets differ per OpenSSL build, so they are data: user space writes each layout
// into a slot of `layouts` (once: a slot is never rewritten, only switched off) and gives each
// library a group g, the cookie of its uprobes (ssl_call, ssl_hs_return). `group_slots`
// lists the slots group g reads with: one once the build's layout is known, up to CANDIDATES
// while user space is still proving which one fits. Reads leave tagged with their slot; only
// a proven slot's keys are ever written.
//
// Triggers: SSL_do_handshake return (ret == 1), and the entry of SSL_read/SSL_write (and their
// _ex forms) and SSL_free: the first I/O after an implicit handshake (SSL_write first,
// BIO_f_ssl), which never calls SSL_do_handshake, and the last chance. Not SSL_in_init, which
// libssl calls ~15 times per connection: a uprobe hit costs up to ~10 us inside a VM (less at an
// instruction the kernel emulates, where keytap.kernel.probe_site puts the probes). The I/O calls
// come many times per connection too, so a cheap fingerprint of what was read is compared with
// what already left the kernel for that connection and slot: each connection's secrets leave
// once per slot, and again only if they change. Once they left with the one layout its library
// reads with, the connection is `settled`: a later I/O call reads only its client random (and
// the s3 pointer, where there is one), which a new handshake on the same SSL (or a new SSL at
// the same address) changes, and returns (~0.3 us where the full check took ~2 us a call).
//
// Implausible reads are counted per slot, for user space's self-check.
//
// Scope: only processes whose network namespace is in `scope_netns` (bpf/scope.h).
//
// Sizes and enums shared with user space come in as -D defines from keytap/kernel/abi.py.
#include <uapi/linux/ptrace.h>
#include "read_user.h"

#if !defined(LIBRARY_GROUPS) || !defined(CANDIDATES) || !defined(LAYOUT_SLOTS) || !defined(ABSENT) \
    || !defined(RANDOM_SIZE) || !defined(SECRET_SIZE) || !defined(MASTER_KEY_SIZE)
#error "compile through keytap.kernel.abi.tls_defines()"
#endif
#define TLS_ANY_VERSION 0x10000
#define TLS1_2_VERSION 0x0303
#define TLS1_3_VERSION 0x0304
#define TLS1_FLAGS_QUIC 0x2000  // include/internal/ssl.h, 3.2+

struct layout {
    s32 ssl_version;
    s32 ssl_type;                 // ABSENT before 3.2
    s32 server;
    s32 s3;
    s32 s3_is_pointer;
    s32 s3_client_random;
    s32 session;
    s32 session_master_key;
    s32 session_master_key_length;
    s32 session_cipher;
    s32 cipher_id;
    s32 handshake_secret;         // TLS 1.3 fields: ABSENT before 1.1.1
    s32 handshake_traffic_hash;
    s32 client_app_traffic_secret;
    s32 server_app_traffic_secret;
    s32 exporter_master_secret;
};

struct secrets_event {
    u64 ktime_ns;
    u64 ssl;
    u32 tgid;
    u32 slot;
    s32 version;
    s32 server;
    u32 cipher_id;
    u32 master_key_length;
    u8 client_random[RANDOM_SIZE];
    u8 master_key[MASTER_KEY_SIZE];
    u8 handshake_secret[SECRET_SIZE];
    u8 handshake_traffic_hash[SECRET_SIZE];
    u8 client_app_traffic_secret[SECRET_SIZE];
    u8 server_app_traffic_secret[SECRET_SIZE];
    u8 exporter_master_secret[SECRET_SIZE];
    char comm[16];  // the process's command (TASK_COMM_LEN), for the packet comment
};

struct tls_connection {
    u64 ssl;
    u32 tgid;
    u32 slot;
};

struct tls_endpoint {  // a connection, whichever slot
    u64 ssl;
    u32 tgid;
    u32 pad;
};

struct settled_connection {  // its secrets left the kernel with `slot`, for this client random
    const char *s3;
    u64 random_head;
    u32 slot;
};

// Per slot, so that user space can tell which library's table does not fit.
enum counter { IMPLAUSIBLE_VERSION, RING_FULL, NOT_TLS, COUNTERS };

BPF_ARRAY(layouts, struct layout, LAYOUT_SLOTS);
BPF_ARRAY(group_slots, s32, LIBRARY_GROUPS * CANDIDATES);  // ABSENT: no layout there
BPF_TABLE("lru_hash", struct tls_connection, u64, emitted, 65536);
BPF_TABLE("lru_hash", struct tls_endpoint, struct settled_connection, settled, 65536);
BPF_HASH(handshake_calls, u64, u64, 16384);  // pid_tgid -> SSL* across SSL_do_handshake
BPF_PERCPU_ARRAY(counters, u64, COUNTERS * LAYOUT_SLOTS);
BPF_RINGBUF_OUTPUT(secrets, 256);
BPF_HASH(scope_netns, u32, u8, 1024);

#include "scope.h"

static __always_inline bool in_scope(void)
{
#ifdef SCOPE_ALL_PROCESSES
    return true;
#else
    u32 inum = current_netns();
    return scope_netns.lookup(&inum) != NULL;
#endif
}

static __always_inline void count(u32 slot, u32 which)
{
    u32 index = slot * COUNTERS + which;
    u64 *value = counters.lookup(&index);
    if (value)
        (*value)++;
}

static __always_inline u64 read_u64(const char *address)
{
    u64 value = 0;
    read_user(&value, sizeof(value), address);
    return value;
}

// A QUIC connection's handshake runs in a TLS object of its own (type 0, driven by libssl
// through the probed functions), marked TLS1_FLAGS_QUIC in s3.flags, the first member of the
// embedded s3 state from 3.2 on. Its secrets are QUIC's: no TCP ClientHello carries their
// random (it is inside QUIC's Initial packets), so the reorder buffer could neither confirm
// them nor write them ahead of their packets. Skipped with the QUIC objects.
static __always_inline bool quic_handshake_layer(const char *ssl, struct layout *l)
{
    u64 flags = read_u64(ssl + l->s3);
    return flags & TLS1_FLAGS_QUIC;
}

// `completed`: called when SSL_do_handshake returned 1, so a version must have been negotiated.
// True when this connection's secrets have left the kernel with `slot` (now or before); then
// `settled` says how to tell the connection later.
static __always_inline bool read_with_slot(const char *ssl, u32 slot, bool completed,
                                           struct settled_connection *settled)
{
    struct layout *l = layouts.lookup(&slot);
    if (!l || l->ssl_version < 0)
        return false;  // no table in this slot, or user space switched it off (self-check failed)
    if (l->ssl_type != ABSENT) {
        // First: a QUIC object's fields are elsewhere, its "version" would look like garbage.
        s32 type = 0;
        read_user(&type, sizeof(type), ssl + l->ssl_type);
        if (type != 0 || quic_handshake_layer(ssl, l)) {
            count(slot, NOT_TLS);  // a QUIC connection, stream or listener, or its TLS layer
            return false;
        }
    }
    s32 version = 0;
    read_user(&version, sizeof(version), ssl + l->ssl_version);
    if (!completed && (version == 0 || version == TLS_ANY_VERSION))
        return false;  // not negotiated yet
    if (version < 0x0300 || version > TLS1_3_VERSION) {
        // DTLS (0xfeff...), or a table that does not fit this library: never trust the rest
        count(slot, IMPLAUSIBLE_VERSION);
        return false;
    }
    const char *s3 = ssl + l->s3;
    if (l->s3_is_pointer)
        s3 = (const char *)read_u64(s3);
    if (!s3)
        return false;
    const char *session = (const char *)read_u64(ssl + l->session);
    if (!session)
        return false;

    // Cheap readiness check and fingerprint before copying everything.
    u64 random_head = read_u64(s3 + l->s3_client_random);
    u64 secret_head;
    if (version == TLS1_3_VERSION) {
        if (l->client_app_traffic_secret == ABSENT)
            return false;
        u64 client_head = read_u64(ssl + l->client_app_traffic_secret);
        u64 server_head = read_u64(ssl + l->server_app_traffic_secret);
        if (!client_head || !server_head)
            return false;  // one side's secrets first: wait for both, send once
        secret_head = client_head ^ server_head;
    } else {
        secret_head = read_u64(session + l->session_master_key);
    }
    if (!secret_head || !random_head)
        return false;  // keys not derived yet
    u64 fingerprint = random_head * 31 + secret_head;
    struct tls_connection key = {
        .ssl = (u64)ssl, .tgid = bpf_get_current_pid_tgid() >> 32, .slot = slot};
    settled->s3 = s3;
    settled->random_head = random_head;
    settled->slot = slot;
    u64 *previous = emitted.lookup(&key);
    if (previous && *previous == fingerprint)
        return true;

    struct secrets_event *event = secrets.ringbuf_reserve(sizeof(struct secrets_event));
    if (!event) {
        count(slot, RING_FULL);
        return false;  // not remembered as emitted: the next call tries again
    }
    __builtin_memset(event, 0, sizeof(*event));
    event->ktime_ns = bpf_ktime_get_ns();
    event->ssl = key.ssl;
    event->tgid = key.tgid;
    bpf_get_current_comm(event->comm, sizeof(event->comm));
    event->slot = slot;
    event->version = version;
    read_user(&event->server, sizeof(event->server), ssl + l->server);
    read_user(event->client_random, RANDOM_SIZE, s3 + l->s3_client_random);
    const char *cipher = (const char *)read_u64(session + l->session_cipher);
    if (cipher)
        read_user(&event->cipher_id, sizeof(event->cipher_id), cipher + l->cipher_id);
    if (version == TLS1_3_VERSION) {
        read_user(event->handshake_secret, SECRET_SIZE, ssl + l->handshake_secret);
        read_user(event->handshake_traffic_hash, SECRET_SIZE,
                  ssl + l->handshake_traffic_hash);
        read_user(event->client_app_traffic_secret, SECRET_SIZE,
                  ssl + l->client_app_traffic_secret);
        read_user(event->server_app_traffic_secret, SECRET_SIZE,
                  ssl + l->server_app_traffic_secret);
        read_user(event->exporter_master_secret, SECRET_SIZE,
                  ssl + l->exporter_master_secret);
    } else {
        read_user(&event->master_key_length, sizeof(event->master_key_length),
                  session + l->session_master_key_length);
        read_user(event->master_key, MASTER_KEY_SIZE, session + l->session_master_key);
    }
    emitted.update(&key, &fingerprint);
    secrets.ringbuf_submit(event, BPF_RB_NO_WAKEUP);  // polled every loop: a wakeup is a self-IPI
    return true;
}

// The group's one slot, or ABSENT while it reads with several (or none).
static __always_inline s32 only_slot(u32 group)
{
    s32 only = ABSENT;
    for (u32 candidate = 0; candidate < CANDIDATES; candidate++) {
        u32 index = group * CANDIDATES + candidate;
        s32 *slot = group_slots.lookup(&index);
        if (slot && *slot >= 0 && *slot < LAYOUT_SLOTS) {
            if (only != ABSENT)
                return ABSENT;
            only = *slot;
        }
    }
    return only;
}

// Whether the connection's secrets already left with the slot its group now reads with alone,
// for the client random it has now.
static __always_inline bool still_settled(const char *ssl, u32 group, struct tls_endpoint *key)
{
    struct settled_connection *settled_as = settled.lookup(key);
    if (!settled_as || (s32)settled_as->slot != only_slot(group))
        return false;
    u32 slot = settled_as->slot;
    struct layout *l = layouts.lookup(&slot);
    if (!l || l->ssl_version < 0)
        return false;
    const char *s3 = ssl + l->s3;
    if (l->s3_is_pointer)
        s3 = (const char *)read_u64(s3);
    return s3 == settled_as->s3 && read_u64(s3 + l->s3_client_random) == settled_as->random_head;
}

static __always_inline int on_ssl(const char *ssl, u32 group, bool completed)
{
    if (!ssl || group >= LIBRARY_GROUPS)
        return 0;
    struct tls_endpoint key = {.ssl = (u64)ssl, .tgid = bpf_get_current_pid_tgid() >> 32};
    if (!completed && still_settled(ssl, group, &key))
        return 0;  // an I/O call on a connection whose secrets are out: the common case
    if (!in_scope())
        return 0;
    s32 only = only_slot(group);
    struct settled_connection settled_as = {};
    // A bounded loop, not unrolled: unrolled, its copies of read_with_slot took ~0.1 s more
    // to compile at every start.
#pragma clang loop unroll(disable)
    for (u32 candidate = 0; candidate < CANDIDATES; candidate++) {
        u32 index = group * CANDIDATES + candidate;
        s32 *slot = group_slots.lookup(&index);
        if (slot && *slot >= 0 && *slot < LAYOUT_SLOTS
            && read_with_slot(ssl, *slot, completed, &settled_as) && *slot == only)
            settled.update(&key, &settled_as);
    }
    return 0;
}

int ssl_hs_entry(struct pt_regs *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u64 ssl = PT_REGS_PARM1(ctx);
    handshake_calls.update(&pid_tgid, &ssl);
    return 0;
}

static __always_inline int on_hs_return(struct pt_regs *ctx, u32 group)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u64 *ssl = handshake_calls.lookup(&pid_tgid);
    if (!ssl)
        return 0;
    u64 address = *ssl;
    handshake_calls.delete(&pid_tgid);
    if ((int)PT_REGS_RC(ctx) != 1)
        return 0;
    return on_ssl((const char *)address, group, true);
}

// The group is the link's cookie (keytap.kernel.uprobes): one program for every library.
int ssl_call(struct pt_regs *ctx)
{
    return on_ssl((const char *)PT_REGS_PARM1(ctx), bpf_get_attach_cookie(ctx), false);
}

int ssl_hs_return(struct pt_regs *ctx) { return on_hs_return(ctx, bpf_get_attach_cookie(ctx)); }
