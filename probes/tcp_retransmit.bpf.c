/* tcp_retransmit.bpf.c - TCP retransmitted segments per connection, peer or workload.
 *
 * Hooks:      raw tracepoints tcp_retransmit_skb (every retransmission attempt; softirq or
 *             timer context, so `current` is not the socket's owner) and
 *             tcp_retransmit_synack (a SYN-ACK sent again: RetransSegs counts those too),
 *             and for ownership inet_sock_set_state: connect() (SYN_SENT) and listen()
 *             (LISTEN) run in the owner's context; a socket born accepted (SYN_RECV)
 *             takes the owner of the listener on its (network namespace, local port);
 *             the final close forgets the socket. No hook on sends or receives: the
 *             owner is who connected or listened, found at a state change (a few per
 *             connection) instead of on every send and receive.
 *             Raw, not classic, tracepoints: a classic tracepoint program is skipped when
 *             any other classic tracepoint or kprobe program is running on the CPU (the
 *             kernel's bpf_prog_active guard), e.g. a state change interrupted by the
 *             softirq that retransmits. Measured with classic tracepoints: in one run of
 *             six, 2 of 50 retransmitted buffers (90 of 1898 segments) went uncounted. A
 *             raw tracepoint program is skipped only when it interrupts itself.
 * Aggregates: per (family, local addr/port, peer addr/port, TCP state, error, owner's
 *             cgroup and executable - or owner tgid, with OWNER_PROCESS) the number of retransmitted *segments*: tcp_skb_pcount(skb),
 *             read from TCP_SKB_CB(skb)->tcp_gso_segs, since under GSO/TSO one buffer (one
 *             tracepoint hit) carries up to 64 KiB of segments. Every struct offset read
 *             here (SKB_PCOUNT_OFF, SK_*_OFF) comes from the running kernel's BTF: the
 *             kernel headers BCC compiles against may be another version's.
 *             Aggregation (compile time): KEY_CONNECTION keeps the whole 4-tuple; KEY_PEER
 *             keeps the far end of a connection this host opened (peer address and port:
 *             the service called) and, for a connection it accepted, the peer address and
 *             the local port (the service offered), so no ephemeral port makes a key;
 *             neither keeps only (family, state, error, owner): one key per workload.
 *             Failed attempts (err != 0: not sent, or refused below TCP) are keyed by
 *             their errno, so successes and failures never share a counter.
 * Maps:       retransmits  LRU hash, MAX_ENTRIES keys; drained (lookup and delete) by user
 *                          space every collection, so it holds one interval of keys.
 *                          When full, LRU evicts the least recently counted key rather
 *                          than refusing new connections; user space estimates evictions
 *                          from STAT_INSERTS against the keys it drained.
 *             owners       LRU hash, OWNER_ENTRIES sockets: struct sock * -> the
 *                          process (tgid, cgroup, comm) that connected or listened on it
 *                          (an accepted socket: its listener's), and whether it is a
 *                          listener or was accepted; deleted at TCP_CLOSE.
 *             exe_names    hash, EXE_NAMES executables: id -> name, filled at connect and
 *                          listen, read when a key is first counted.
 *             listeners    hash, LISTENER_ENTRIES: (network namespace, port) -> the
 *                          listening socket's owner, for the sockets it accepts; deleted
 *                          when that listener closes.
 *             probe_stats  per-CPU counters: tracepoint hits and what could not be
 *                          recorded exactly.
 *             event_rate   1-entry array: the event rate limiter's state (GCRA, one u64).
 *             events       ring buffer of single retransmission attempts, with EVENTS.
 * Emits:      with EVENTS, one event per retransmission attempt, full 4-tuple whatever
 *             the aggregation, at most EVENT_RATE per second (burst EVENT_BURST); refused
 *             and dropped events are counted in probe_stats.
 * Cost:       per retransmission: two probe reads (the sock's addresses in one, the
 *             segment count), two hash lookups (owner, key) and one atomic add; a new key
 *             per interval costs one insert. Nothing per send or receive. Per TCP state
 *             change: compares, and for the four states that matter a probe read and one
 *             or two hash updates (connect, listen, accept, close).
 *
 * Compile-time switches (cflags from otel_ebpf/probes/tcp_retransmit.py):
 *   MAX_ENTRIES, OWNER_ENTRIES, LISTENER_ENTRIES, EXE_NAMES, OWNER_PROCESS, the offsets
 *   workload.h reads, HAVE_ERR (the tracepoint passes `err`, 6.17+; before, it
 *   fired on successes only), KEY_CONNECTION, KEY_PEER, EVENTS, EVENT_RATE, EVENT_BURST,
 *   RINGBUF_PAGES; offsets SKB_PCOUNT_OFF, SK_PROTOCOL_OFF, SK_FAMILY_OFF, SK_STATE_OFF,
 *   SK_NUM_OFF, SK_DPORT_OFF, SK_NET_OFF (absent without network namespaces), SK_RCV_SADDR_OFF, SK_DADDR_OFF, SK_V6_RCV_SADDR_OFF and
 *   SK_V6_DADDR_OFF (both absent without IPv6), SKC_READ: the bytes of struct sock from
 *   its start that cover every SK_*_OFF field but the protocol, and REQ_COMMON_OFF: where
 *   struct request_sock keeps its struct sock_common.
 */
/* task_struct only as an opaque pointer (task storage); no kernel header needed */
struct task_struct;
#define TASK_COMM_LEN 16
#include "rate_limit.h"
#include "workload.h"

/* ABI constants, spelled out so that no header version can change them. */
#define FAMILY_INET 2
#define FAMILY_INET6 10
#define PROTO_TCP 6
#define STATE_SYN_SENT 2
#define STATE_SYN_RECV 3
#define STATE_CLOSE 7
#define STATE_LISTEN 10

#define OWNER_ACCEPTED 1  /* owner.flags: a listener, or a socket it accepted */

struct conn_key {
    u8 local_addr[16];  /* IPv6, or IPv4-mapped IPv6 (::ffff:a.b.c.d) for IPv4 */
    u8 peer_addr[16];
    u16 local_port;     /* host byte order; 0: not kept by the aggregation */
    u16 peer_port;
    u16 family;         /* on the wire: AF_INET also for IPv4-mapped peers of AF_INET6 */
    u8 state;
    u8 _pad;
    s32 err;            /* 0, or the negative errno of a failed attempt */
    u32 tgid;           /* owner, with OWNER_PROCESS; 0 when no owner is known */
    u64 cgroup_id;      /* owner's cgroup */
    u64 exe;            /* owner's executable (workload.h), unless OWNER_PROCESS */
};

struct conn_value {
    u64 segments;
    char comm[TASK_COMM_LEN];  /* the owner's thread name when the key was first counted */
    char exe[EXE_LEN];         /* the owner's executable */
};

struct owner {
    u32 tgid;
    u32 flags;
    u64 cgroup_id;
    u64 exe;
    char comm[TASK_COMM_LEN];
};

struct listener_key {
    u64 net;    /* struct net *: ports are per network namespace */
    u16 port;   /* host order */
    u16 _pad[3];
};

struct listener {
    u64 sk;     /* the listening socket: only its own close forgets the entry */
    struct owner owner;
};

enum probe_stat {
    STAT_HITS = 0,               /* tracepoint hits: what a naive counter would report */
    STAT_MAP_FULL = 1,           /* a new key could not be inserted: its segments are lost */
    STAT_PCOUNT_UNREADABLE = 2,  /* segment count unreadable or 0: counted as one */
    STAT_INSERTS = 3,            /* keys inserted into retransmits (eviction estimate) */
    STAT_NO_OWNER = 4,           /* hits on a socket no process was seen using */
    STAT_RATE_LIMITED = 5,       /* events refused by the token bucket */
    STAT_BUFFER_FULL = 6,        /* events that found the ring buffer full */
    STAT_COUNT = 7,
};

BPF_TABLE("lru_hash", struct conn_key, struct conn_value, retransmits, MAX_ENTRIES);
BPF_TABLE("lru_hash", u64, struct owner, owners, OWNER_ENTRIES);
BPF_HASH(listeners, struct listener_key, struct listener, LISTENER_ENTRIES);
struct exe_name_value { char name[EXE_LEN]; };
BPF_F_TABLE("hash", u64, struct exe_name_value, exe_names, EXE_NAMES, BPF_F_NO_PREALLOC);
#include "probe_stats.h"

#ifdef EVENTS
struct retransmit_event {
    u64 time_ns;        /* CLOCK_MONOTONIC */
    u64 cgroup_id;
    u8 local_addr[16];
    u8 peer_addr[16];
    u16 local_port;
    u16 peer_port;
    u16 family;
    u8 state;
    u8 _pad;
    s32 err;
    u32 segments;
    u32 tgid;
    u32 _pad2;
    char comm[TASK_COMM_LEN];
};

BPF_ARRAY(event_rate, u64, 1);  /* GCRA theoretical arrival time, ns */
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#endif

static __always_inline u16 read_u16(const void *sk, u32 off)
{
    u16 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (const char *)sk + off);
    return v;
}

static __always_inline u64 read_u64(const void *sk, u32 off)
{
    u64 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (const char *)sk + off);
    return v;
}

static __always_inline struct listener_key listener_key_of(const void *sk)
{
    struct listener_key key = {};
#ifdef SK_NET_OFF
    key.net = read_u64(sk, SK_NET_OFF);
#endif
    key.port = read_u16(sk, SK_NUM_OFF);  /* skc_num is host order */
    return key;
}

/* The calling process owns the socket (connect() and listen() run in its context). */
static __always_inline struct owner caller(u32 flags)
{
    struct owner o = {.flags = flags};
    o.tgid = bpf_get_current_pid_tgid() >> 32;
    o.cgroup_id = bpf_get_current_cgroup_id();
    bpf_get_current_comm(&o.comm, sizeof(o.comm));
    u64 exe_file = current_exe_file();
    o.exe = exe_id(exe_file);
    if (o.exe && !exe_names.lookup(&o.exe)) {
        struct exe_name_value name = {};
        exe_name(exe_file, name.name);
        exe_names.update(&o.exe, &name);
    }
    return o;
}

/* Named on_* rather than BCC's raw_tracepoint__* so that BCC does not attach them on
 * load (`doctor` verifies without attaching).
 *
 * connect() moves a socket to SYN_SENT and listen() to LISTEN, both in the caller's
 * context: the owner is known before the first SYN or SYN-ACK can be retransmitted. A
 * socket born in SYN_RECV was accepted (softirq): it belongs to its listener's owner,
 * found by namespace and port. TCP_CLOSE is the socket's end (maybe in softirq, a reset):
 * forget it, so that a reused address does not inherit the owner, and a closing listener
 * its port. */
int on_state(struct bpf_raw_tracepoint_args *ctx)
{
    /* args: const struct sock *sk, const int oldstate, const int newstate */
    const void *sk = (const void *)ctx->args[0];
    int oldstate = (int)ctx->args[1];
    int newstate = (int)ctx->args[2];
    if (newstate != STATE_SYN_SENT && newstate != STATE_LISTEN &&
        newstate != STATE_SYN_RECV && newstate != STATE_CLOSE)
        return 0;
    if (!sk || read_u16(sk, SK_PROTOCOL_OFF) != PROTO_TCP)
        return 0;
    u64 key = (u64)sk;
    if (newstate == STATE_SYN_SENT) {
        struct owner o = caller(0);
        owners.update(&key, &o);
    } else if (newstate == STATE_LISTEN) {
        struct listener l = {.sk = key, .owner = caller(OWNER_ACCEPTED)};
        struct listener_key lk = listener_key_of(sk);
        owners.update(&key, &l.owner);
        listeners.update(&lk, &l);
    } else if (newstate == STATE_SYN_RECV) {
        struct listener_key lk = listener_key_of(sk);
        struct listener *l = listeners.lookup(&lk);
        struct owner accepted = {.flags = OWNER_ACCEPTED};
        if (l)
            accepted = l->owner;
        owners.update(&key, &accepted);
    } else {
        owners.delete(&key);
        if (oldstate == STATE_LISTEN) {
            struct listener_key lk = listener_key_of(sk);
            struct listener *l = listeners.lookup(&lk);
            if (l && l->sk == key)
                listeners.delete(&lk);
        }
    }
    return 0;
}

#ifdef EVENTS
/* At most EVENT_BURST + t * EVENT_RATE events in any t seconds (rate_limit.h). */
static __always_inline int take_token(u64 now)
{
    u32 zero = 0;
    u64 *tat = event_rate.lookup(&zero);
    return tat && rate_limit_admit(tat, now, 1000000000ULL / EVENT_RATE, EVENT_BURST);
}

static __always_inline void emit(struct conn_key *key, u32 segments, struct owner *o)
{
    u64 now = bpf_ktime_get_ns();
    if (!take_token(now)) {
        count_stat(STAT_RATE_LIMITED);
        return;
    }
    struct retransmit_event ev = {};
    ev.time_ns = now;
    ev.cgroup_id = key->cgroup_id;
    __builtin_memcpy(ev.local_addr, key->local_addr, 16);
    __builtin_memcpy(ev.peer_addr, key->peer_addr, 16);
    ev.local_port = key->local_port;
    ev.peer_port = key->peer_port;
    ev.family = key->family;
    ev.state = key->state;
    ev.err = key->err;
    ev.segments = segments;
    ev.tgid = key->tgid;
    if (o)
        __builtin_memcpy(ev.comm, o->comm, TASK_COMM_LEN);
    if (events.ringbuf_output(&ev, sizeof(ev), 0) < 0)
        count_stat(STAT_BUFFER_FULL);
}
#endif

/* Segments in this buffer: tcp_skb_pcount(skb) == TCP_SKB_CB(skb)->tcp_gso_segs, a u16 in
 * skb->cb[]; SKB_PCOUNT_OFF = offsetof(sk_buff, cb) + offsetof(tcp_skb_cb, tcp_gso_segs).
 * The skb is the one in the retransmit queue, and the socket is locked here, so it
 * cannot be freed under the read. */
static __always_inline u32 segment_count(const void *skb)
{
    u16 segs = 0;
    if (bpf_probe_read_kernel(&segs, sizeof(segs), (const char *)skb + SKB_PCOUNT_OFF) == 0
        && segs >= 1)
        return segs;
    count_stat(STAT_PCOUNT_UNREADABLE);
    return 1;
}

static __always_inline u16 be16_to_host(u16 v)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    return __builtin_bswap16(v);
#else
    return v;
#endif
}

/* The endpoints as the tcp_retransmit_skb tracepoint itself reports them (its
 * TP_STORE_ADDRS): IPv6 sockets' addresses, else IPv4 as IPv4-mapped IPv6, so one layout
 * serves both. One probe read of the start of struct sock covers every field. */
static __always_inline int read_endpoints(const void *sk, struct conn_key *key)
{
    u8 skc[SKC_READ];
    if (bpf_probe_read_kernel(skc, sizeof(skc), sk) != 0)
        return -1;
    u16 family, num, dport;
    __builtin_memcpy(&family, skc + SK_FAMILY_OFF, 2);
    __builtin_memcpy(&num, skc + SK_NUM_OFF, 2);
    __builtin_memcpy(&dport, skc + SK_DPORT_OFF, 2);
    key->state = skc[SK_STATE_OFF];
    key->local_port = num;                 /* skc_num is host order */
    key->peer_port = be16_to_host(dport);  /* skc_dport is network order */
    key->family = family;
#ifdef SK_V6_DADDR_OFF
    if (family == FAMILY_INET6) {
        __builtin_memcpy(key->local_addr, skc + SK_V6_RCV_SADDR_OFF, 16);
        __builtin_memcpy(key->peer_addr, skc + SK_V6_DADDR_OFF, 16);
        return 0;
    }
#endif
    key->local_addr[10] = key->local_addr[11] = 0xff;
    key->peer_addr[10] = key->peer_addr[11] = 0xff;
    __builtin_memcpy(key->local_addr + 12, skc + SK_RCV_SADDR_OFF, 4);
    __builtin_memcpy(key->peer_addr + 12, skc + SK_DADDR_OFF, 4);
    return 0;
}

/* The family on the wire: an AF_INET6 socket talking to an IPv4-mapped peer
 * (::ffff:a.b.c.d, a dual-stack socket) sends IPv4, and is keyed and reported as such,
 * so that a peer is one series whichever socket family reached it. */
static __always_inline u16 wire_family(u16 family, const u8 *peer)
{
    if (family != FAMILY_INET6)
        return family;
#pragma unroll
    for (int i = 0; i < 10; i++)
        if (peer[i])
            return family;
    return peer[10] == 0xff && peer[11] == 0xff ? FAMILY_INET : family;
}

/* Count `segments` under the key, attributed to the owner of `owner_sk` (the socket
 * itself, or for a SYN-ACK the listener). */
static __always_inline void count(const void *owner_sk, struct conn_key *key, u32 segments)
{
    key->family = wire_family(key->family, key->peer_addr);
    u64 sk_key = (u64)owner_sk;
    struct owner *o = owners.lookup(&sk_key);
    if (o && o->tgid) {
        key->tgid = o->tgid;
        key->cgroup_id = o->cgroup_id;
        key->exe = o->exe;
    } else {
        count_stat(STAT_NO_OWNER);
    }
#ifdef EVENTS
    emit(key, segments, o);
#endif

#ifndef OWNER_PROCESS
    key->tgid = 0;  /* the owner's workload: its cgroup and executable */
#else
    key->exe = 0;
#endif
#ifndef KEY_CONNECTION
#ifdef KEY_PEER
    __builtin_memset(key->local_addr, 0, 16);
    if (o && (o->flags & OWNER_ACCEPTED))
        key->peer_port = 0;   /* the client's ephemeral port; keep the service's */
    else
        key->local_port = 0;  /* our ephemeral port; keep the called service's */
#else
    __builtin_memset(key->local_addr, 0, 16);
    __builtin_memset(key->peer_addr, 0, 16);
    key->local_port = 0;
    key->peer_port = 0;
#endif
#endif

    struct conn_value *value = retransmits.lookup(key);
    if (!value) {
        struct conn_value init = {};
        if (o) {
            __builtin_memcpy(init.comm, o->comm, TASK_COMM_LEN);
            struct exe_name_value *name = exe_names.lookup(&o->exe);
            if (name)
                __builtin_memcpy(init.exe, name->name, EXE_LEN);
        }
        /* insert() is BPF_NOEXIST: when another CPU inserted the key first, its entry
         * stays and the lookup below finds it. */
        if (retransmits.insert(key, &init) == 0)
            count_stat(STAT_INSERTS);
        value = retransmits.lookup(key);
        if (!value) {
            count_stat(STAT_MAP_FULL);
            return;
        }
    }
    __sync_fetch_and_add(&value->segments, segments);
}

int on_retransmit(struct bpf_raw_tracepoint_args *ctx)
{
    /* args: const struct sock *sk, const struct sk_buff *skb[, int err (6.17+)] */
    const void *sk = (const void *)ctx->args[0];
    count_stat(STAT_HITS);
    u32 segments = segment_count((const void *)ctx->args[1]);
    /* A failed read leaves the key zero (family 0): the segments are still counted,
     * they matter more than where they went. */
    struct conn_key key = {};
    read_endpoints(sk, &key);
#ifdef HAVE_ERR
    key.err = (s32)ctx->args[2];
#endif
    count(sk, &key, segments);
    return 0;
}

/* A SYN-ACK sent again for a connection not yet accepted: one segment, which the kernel
 * adds to RetransSegs too. Its addresses are in the request sock, whose first member is
 * a struct sock_common like a socket's (at REQ_COMMON_OFF); it has no owner yet, so it
 * is counted under the listener's. The kernel traces only successful ones. */
int on_synack(struct bpf_raw_tracepoint_args *ctx)
{
    /* args: const struct sock *sk (the listener), const struct request_sock *req */
    count_stat(STAT_HITS);
    struct conn_key key = {};
    read_endpoints((const char *)ctx->args[1] + REQ_COMMON_OFF, &key);
    count((const void *)ctx->args[0], &key, 1);
    return 0;
}
