/* tcp_retransmit.bpf.c - TCP retransmitted segments per connection, peer or workload.
 *
 * Hooks:      tracepoint tcp/tcp_retransmit_skb (every retransmission attempt; softirq or
 *             timer context, so `current` is not the socket's owner), and for ownership
 *             tracepoints sock/sock_send_length, sock/sock_recv_length (process context:
 *             every send and receive on a socket) and sock/inet_sock_set_state (connect(),
 *             the birth of an accepted socket, and the final close).
 * Aggregates: per (family, local addr/port, peer addr/port, TCP state, error, owner tgid,
 *             owner cgroup) the number of retransmitted *segments*: tcp_skb_pcount(skb),
 *             read from TCP_SKB_CB(skb)->tcp_gso_segs, since under GSO/TSO one buffer (one
 *             tracepoint hit) carries up to 64 KiB of segments. The offset comes from the
 *             running kernel's BTF through SKB_PCOUNT_OFFSET: the kernel headers BCC
 *             compiles against may be another version's, with another sk_buff layout.
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
 *             owners       LRU hash, OWNER_ENTRIES sockets: struct sock * -> the last
 *                          process (tgid, cgroup, comm) that sent, received or connected
 *                          on it, and whether it was accepted; deleted at TCP_CLOSE.
 *             probe_stats  per-CPU counters: tracepoint hits and what could not be
 *                          recorded exactly.
 *             event_rate   1-entry array: the event rate limiter's state (GCRA, one u64).
 *             events       ring buffer of single retransmission attempts, with EVENTS.
 * Emits:      with EVENTS, one event per retransmission attempt, full 4-tuple whatever
 *             the aggregation, at most EVENT_RATE per second (burst EVENT_BURST); refused
 *             and dropped events are counted in probe_stats.
 * Cost:       per retransmission: one 2-byte probe read, two hash lookups (owner, key),
 *             one atomic add; a new key per interval costs one insert. Per send/receive
 *             on any socket: a family/protocol compare; on TCP sockets also two helper
 *             calls and one LRU lookup, plus an update only when another process or
 *             cgroup than last time uses the socket. Per TCP state change: a compare.
 *
 * Compile-time switches (cflags from otel_ebpf/probes/tcp_retransmit.py):
 *   MAX_ENTRIES, OWNER_ENTRIES, SKB_PCOUNT_OFFSET (absent: every hit counts as one segment
 *   and as pcount_unreadable), HAVE_ERR (the tracepoint has `err`, 6.17+; before, it fired
 *   on successes only), KEY_CONNECTION, KEY_PEER, EVENTS, EVENT_RATE, EVENT_BURST,
 *   RINGBUF_PAGES.
 */
#include <linux/sched.h>

/* ABI constants, spelled out so that no header version can change them. */
#define FAMILY_INET 2
#define FAMILY_INET6 10
#define PROTO_TCP 6
#define STATE_SYN_SENT 2
#define STATE_SYN_RECV 3
#define STATE_CLOSE 7

#define OWNER_ACCEPTED 1  /* owner.flags: the socket came from a listener */

struct conn_key {
    u8 local_addr[16];  /* IPv6, or IPv4-mapped IPv6 (::ffff:a.b.c.d) for IPv4 */
    u8 peer_addr[16];
    u16 local_port;     /* host byte order, as the tracepoint gives them; 0: not kept */
    u16 peer_port;
    u16 family;         /* on the wire: AF_INET also for IPv4-mapped peers of AF_INET6 */
    u8 state;
    u8 _pad;
    s32 err;            /* 0, or the negative errno of a failed attempt */
    u32 tgid;           /* owner; 0 when no process was seen using the socket */
    u64 cgroup_id;
};

struct conn_value {
    u64 segments;
    char comm[TASK_COMM_LEN];  /* the owner's name when the key was first counted */
};

struct owner {
    u32 tgid;
    u32 flags;
    u64 cgroup_id;
    char comm[TASK_COMM_LEN];
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
BPF_PERCPU_ARRAY(probe_stats, u64, STAT_COUNT);

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

static __always_inline void count_stat(u32 stat)
{
    u64 *v = probe_stats.lookup(&stat);
    if (v)
        (*v)++;
}

/* The owner is whoever last used the socket from process context. Sends and receives
 * are hot, so the common case is one lookup and two compares; the entry is rewritten
 * only when another process (fork, fd passing) or another cgroup uses the socket. */
static __always_inline void remember_owner(const void *sk)
{
    u64 key = (u64)sk;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u64 cgroup_id = bpf_get_current_cgroup_id();
    struct owner *known = owners.lookup(&key);
    if (known && known->tgid == tgid && known->cgroup_id == cgroup_id)
        return;
    struct owner fresh = {.tgid = tgid, .cgroup_id = cgroup_id};
    if (known)
        fresh.flags = known->flags;
    bpf_get_current_comm(&fresh.comm, sizeof(fresh.comm));
    owners.update(&key, &fresh);
}

static __always_inline int is_tcp(u16 family, u16 protocol)
{
    return protocol == PROTO_TCP && (family == FAMILY_INET || family == FAMILY_INET6);
}

/* Named on_* rather than BCC's tracepoint__* so that BCC does not attach them on load
 * (`doctor` verifies without attaching). */
int on_send(struct tracepoint__sock__sock_send_length *args)
{
    if (is_tcp(args->family, args->protocol))
        remember_owner(args->sk);
    return 0;
}

int on_recv(struct tracepoint__sock__sock_recv_length *args)
{
    if (is_tcp(args->family, args->protocol))
        remember_owner(args->sk);
    return 0;
}

/* connect() moves a socket to SYN_SENT in the caller's context: the owner is known
 * before the first SYN can be retransmitted. A socket born in SYN_RECV was accepted
 * (softirq: its owner comes with its first send or receive). TCP_CLOSE is the socket's
 * end (maybe in softirq, a reset): forget it, so that a reused address does not inherit
 * the owner. */
int on_state(struct tracepoint__sock__inet_sock_set_state *args)
{
    if (args->protocol != PROTO_TCP)
        return 0;
    u64 key = (u64)args->skaddr;
    if (args->newstate == STATE_SYN_SENT) {
        remember_owner(args->skaddr);
    } else if (args->newstate == STATE_SYN_RECV) {
        struct owner accepted = {.flags = OWNER_ACCEPTED};
        owners.update(&key, &accepted);
    } else if (args->newstate == STATE_CLOSE) {
        owners.delete(&key);
    }
    return 0;
}

#ifdef EVENTS
/* Rate limit as GCRA, the token bucket kept as one "theoretical arrival time" so that a
 * compare-and-swap can update it: tracing programs may not take bpf_spin_lock. Each event
 * moves the time EVENT_INTERVAL_NS ahead; an event that would move it more than
 * EVENT_BURST intervals past now is refused. At most EVENT_BURST + t * EVENT_RATE events
 * pass in any t seconds. */
#define EVENT_INTERVAL_NS (1000000000ULL / EVENT_RATE)
static __always_inline int take_token(u64 now)
{
    u32 zero = 0;
    u64 *tat = event_rate.lookup(&zero);
    if (!tat)
        return 0;
    u64 old = *tat;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        u64 next = (old > now ? old : now) + EVENT_INTERVAL_NS;
        if (next - now > EVENT_BURST * EVENT_INTERVAL_NS)
            return 0;
        u64 seen = __sync_val_compare_and_swap(tat, old, next);
        if (seen == old)
            return 1;
        old = seen;
    }
    return 0;  /* lost four races in a row: the limit is being hit anyway */
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
 * skb->cb[]; SKB_PCOUNT_OFFSET = offsetof(sk_buff, cb) + offsetof(tcp_skb_cb,
 * tcp_gso_segs). The skb is the one in the retransmit queue, and the socket is locked
 * here, so it cannot be freed under the read. */
static __always_inline u32 segment_count(const void *skb)
{
#ifdef SKB_PCOUNT_OFFSET
    u16 segs = 0;
    if (bpf_probe_read_kernel(&segs, sizeof(segs),
                              (const char *)skb + SKB_PCOUNT_OFFSET) == 0 && segs >= 1)
        return segs;
#endif
    count_stat(STAT_PCOUNT_UNREADABLE);
    return 1;
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

int on_retransmit(struct tracepoint__tcp__tcp_retransmit_skb *args)
{
    count_stat(STAT_HITS);
    u32 segments = segment_count(args->skbaddr);

    /* saddr_v6/daddr_v6 hold the IPv4-mapped form for AF_INET sockets: one layout for
     * both families. */
    struct conn_key key = {};
    __builtin_memcpy(key.local_addr, args->saddr_v6, 16);
    __builtin_memcpy(key.peer_addr, args->daddr_v6, 16);
    key.local_port = args->sport;
    key.peer_port = args->dport;
    /* From here on the stack copy is what is read: left alone, clang may re-read the
     * context through a derived pointer, which the verifier refuses. */
    asm volatile("" ::: "memory");
    key.family = wire_family(args->family, key.peer_addr);
    key.state = (u8)args->state;
#ifdef HAVE_ERR
    key.err = args->err;
#endif
    u64 sk = (u64)args->skaddr;
    struct owner *o = owners.lookup(&sk);
    u32 accepted = 0;
    if (o) {
        key.tgid = o->tgid;
        key.cgroup_id = o->cgroup_id;
        accepted = o->flags & OWNER_ACCEPTED;
    }
    if (!key.tgid)
        count_stat(STAT_NO_OWNER);
#ifdef EVENTS
    emit(&key, segments, o);
#endif

#ifndef KEY_CONNECTION
#ifdef KEY_PEER
    if (accepted) {
        key.peer_port = 0;  /* the client's ephemeral port */
        __builtin_memset(key.local_addr, 0, 16);
    } else {
        key.local_port = 0;  /* our ephemeral port */
        __builtin_memset(key.local_addr, 0, 16);
    }
#else
    __builtin_memset(key.local_addr, 0, 16);
    __builtin_memset(key.peer_addr, 0, 16);
    key.local_port = 0;
    key.peer_port = 0;
#endif
#endif

    struct conn_value *value = retransmits.lookup(&key);
    if (!value) {
        struct conn_value init = {};
        if (o)
            __builtin_memcpy(init.comm, o->comm, TASK_COMM_LEN);
        /* insert() is BPF_NOEXIST: when another CPU inserted the key first, its entry
         * stays and the lookup below finds it. */
        if (retransmits.insert(&key, &init) == 0)
            count_stat(STAT_INSERTS);
        value = retransmits.lookup(&key);
        if (!value) {
            count_stat(STAT_MAP_FULL);
            return 0;
        }
    }
    __sync_fetch_and_add(&value->segments, segments);
    return 0;
}
